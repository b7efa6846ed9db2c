"""A small recipe for a laptop CPU: val loss about 1.75 in a 15-second command on 2 cores.

2 layers, 2 heads, n_embd 64, block_size 64 (0.11M parameters), trained for a time
budget of 12 seconds (the whole command, Python and PyTorch starting included, takes about
13.5 s). On so small a budget the number of steps matters most, so the model is tiny, the
batch small and the learning rates high; Muon (chargpt/muon.py) on the Blocks' matrices gets far
more out of each step than AdamW. Besides Muon it uses rotary positions, QK-norm, no
biases, and a warmup-stable-decay schedule down to 0 (the README's option table): each was
measured at a fixed number of steps over 3 seeds, and kept if it won per second. nanoGPT's
CPU recipe (4 x 128, block 64, batch 12, 2000 steps) reaches 1.88 in about 80 s on the
same kind of machine.

    python train.py config/shakespeare_char_cpu.py
    python train.py config/shakespeare_char_cpu.py --time_budget=0 --max_iters=1000   # steps, not time
"""

out_dir = "out-cpu"
dataset = "shakespeare_char"

n_layer = 2
n_head = 2
n_embd = 64
block_size = 64
dropout = 0.0
position = "rotary"
qk_norm = True
bias = False

optimizer = "muon"
muon_lr = 0.01
learning_rate = 2e-2  # AdamW's, for the embeddings, lm_head and LayerNorm gains
weight_decay = 0.0
batch_size = 16
time_budget = 0.2  # minutes
lr_schedule = "wsd"
cooldown_frac = 0.3
min_lr = 0.0
warmup_iters = 50

# an eval at the start and one at the end (the budget buys about 1,000 steps): each costs
# about 0.3 s of the 12
eval_interval = 5000
eval_iters = 10
eval_sample_chars = 100
log_interval = 100
