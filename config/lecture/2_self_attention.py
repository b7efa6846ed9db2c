"""Stage 2, one head of self-attention: each character gathers information from the ones
before it (a weighted average of their values, weighted by how well its query matches
their keys), on top of token and position embeddings. One Head of size 32, nothing else.
The lecture: val loss 2.4.

    python train.py config/lecture/2_self_attention.py
"""

out_dir = "out-lecture/2_self_attention"
dataset = "shakespeare_char"
dtype = "float32"
init = "pytorch"  # PyTorch's default initial weights, as in the lecture's video

# the lecture's training loop: AdamW with PyTorch's defaults, a constant learning rate, no clipping
batch_size = 32
block_size = 8
max_iters = 5000
learning_rate = 1e-3
min_lr = 1e-3
warmup_iters = 0
weight_decay = 0.01
beta2 = 0.999
grad_clip = 0.0
dropout = 0.0

eval_interval = 500
eval_iters = 200
log_interval = 100

# one Head of 32, straight into lm_head
n_layer = 1
n_head = 1
n_embd = 32
ffwd_mult = 0
residual = False
proj = False
layer_norm = False
