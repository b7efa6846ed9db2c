"""Stage 6, residual connections: each branch adds to x instead of replacing it, through a
projection back into the stream (attention's proj, FeedForward's second Linear, 4x wide
inside). Gradients now reach the first Block. The lecture: val loss 2.08.

    python train.py config/lecture/6_residual.py
"""

out_dir = "out-lecture/6_residual"
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

# 3 Blocks with residual connections and projections, FeedForward 4x wide
n_layer = 3
n_head = 4
n_embd = 32
ffwd_mult = 4
residual = True
proj = True
layer_norm = False
