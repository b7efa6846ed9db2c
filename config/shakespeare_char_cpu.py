"""A small recipe for a laptop CPU: val loss about 1.75 in under 30 seconds on 2 cores.

2 layers, 4 heads, n_embd 64, block_size 64 (0.11M parameters). On a small budget the
number of steps matters most, so the model is tiny, the batch small and the learning rates
high; Muon (muon.py) on the Blocks' matrices gets far more out of each step than AdamW
(1.71 against 1.85 after 2000 steps here). nanoGPT's CPU recipe (4 x 128, block 64,
batch 12, 2000 steps) reaches 1.88 in about 80 s on the same kind of machine.

    python train.py config/shakespeare_char_cpu.py
"""
out_dir = "out-cpu"
dataset = "shakespeare_char"

n_layer = 2
n_head = 4
n_embd = 64
block_size = 64
dropout = 0.0

optimizer = "muon"
muon_lr = 0.01
batch_size = 16
max_iters = 1500
learning_rate = 1e-2
min_lr = 1e-3
warmup_iters = 100

eval_interval = 1000
eval_iters = 50
eval_sample_chars = 100
log_interval = 100
