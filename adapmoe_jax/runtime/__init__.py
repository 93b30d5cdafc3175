"""The offloading runtime: device expert cache, decode engines and their statistics."""
