"""Stage 5, Blocks: communication (attention) then computation (feed-forward), three times.
Deeper, but without residual connections the net is hard to optimise: the lecture says it
"does not do very well" and gives no figure.

    python train.py config/lecture/5_blocks.py
"""

out_dir = "out-lecture/5_blocks"
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

# 3 Blocks of (4 heads of 8, FeedForward), each branch replacing x
n_layer = 3
n_head = 4
n_embd = 32
ffwd_mult = 1
residual = False
proj = False
layer_norm = False
