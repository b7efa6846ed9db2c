"""The lecture's GPT for a 2-core CPU: the lecture's 1.48 in a 15-minute time budget.

The lecture's Blocks (pre-LayerNorm multi-head self-attention and an MLP, a final
LayerNorm, lm_head), narrower and with a shorter context: 6 layers, 4 heads of 32, n_embd
128, block_size 128 (1.2M parameters). The run is a time budget, not a step count: it
stops after 14.9 minutes, evals and checkpoints included, and its learning rate follows
the time spent, so a slower machine takes fewer steps and still ends its decay on time.
What gets it there (each measured alone and together in the README's ablation table):
- Muon for the Blocks' weight matrices (chargpt/muon.py), and dropout 0.1 on the residual
  branches only (not on the attention weights, so attention keeps SDPA's fused kernel);
- warmup-stable-decay: the peak learning rate until the last 30% of the time, then a
  straight line down to zero;
- three opt-in GPTConfig options from recent speed records: rotary positions instead of
  the position table, QK-norm, and squared ReLU in the MLP;
- every training window once per epoch, in a random order (data_order='epoch').
The lecture's own architecture is a matter of dropping those three options (see the
README); its exact recipe, for a GPU, is config/lecture/8_dropout_scaled.py.

    python train.py config/shakespeare_char.py
    python train.py config/shakespeare_char.py --time_budget=30   # a longer budget, a better model
    python train.py config/shakespeare_char.py --time_budget=0 --max_iters=3000   # a step run instead
"""

out_dir = "out"
dataset = "shakespeare_char"

n_layer = 6
n_head = 4
n_embd = 128
block_size = 128
dropout = 0.1
position = "rotary"
qk_norm = True
activation = "relu2"

time_budget = 14.9  # minutes; Python's start and import torch (~2.5 s) come before it
optimizer = "muon"
muon_lr = 0.01
batch_size = 32
learning_rate = 2e-3
lr_schedule = "wsd"
cooldown_frac = 0.3
min_lr = 0.0
warmup_iters = 100
data_order = "epoch"

eval_interval = 500
eval_iters = 20
log_interval = 50
