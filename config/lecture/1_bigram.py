"""Stage 1, the bigram baseline: the next character from the current one alone, a 65 x 65
table of logits. The lecture: val loss 2.5 (and 4.87 before training, where a uniform
guess gives ln(65) = 4.17; this model starts uniform, at 4.17).

    python train.py config/lecture/1_bigram.py
"""

out_dir = "out-lecture/1_bigram"
dataset = "shakespeare_char"
dtype = "float32"
init = "pytorch"  # PyTorch's default initial weights, as in the lecture's video

model_type = "bigram"
block_size = 8
dropout = 0.0

# the lecture's training loop: AdamW with PyTorch's defaults, a constant learning rate, no clipping
batch_size = 32
max_iters = 3000
learning_rate = 1e-2
min_lr = 1e-2
warmup_iters = 0
weight_decay = 0.01
beta2 = 0.999
grad_clip = 0.0

eval_interval = 300
eval_iters = 200
log_interval = 100
