"""Pure policies of the offloading runtime, one module each.

`gating` decides each token's experts (Mixtral routing and AdapMoE's adaptive
gate), `prefetch` predicts the next layer's experts, and `replacement` decides
which cached expert a load evicts (LRU for the runtime, Belady's optimum for
the simulator's bound).
"""
