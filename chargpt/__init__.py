"""The machinery behind the commands at the top of the repository, one concept per module.

    config.py        the knobs (TrainConfig, SampleConfig) and how a command line sets them
    tokenizer.py     characters <-> integers
    data.py          the prepared token files, read back, and batches from them
    optim.py         which weights take which update (AdamW, Muon), and one training step
    muon.py          the Muon optimizer
    schedule.py      how far a run is, and the learning rate there
    checkpoint.py    the checkpoint format: save, load, the random state, resuming
    engine.py        fast generation: the KV cache, the flat decode step, sampling, the decode dtype
    evaluate.py      the loss over a whole split (eval.py, ladder.py)
    lens.py          inside a trained model: the guess layer by layer (logit lens), heads switched off
    machine.py       the device, torchrun's processes, the training dtype, the allocator, timing caches
    memory.py        how much memory a run needs, and refusing one that does not fit
    metrics.py       the progress line, metrics.jsonl and loss.png
    health.py        each layer's activations, gradients and updates at health steps, warnings, health.png
    rundir.py        one run per out_dir, and never a new run over a trained model
    atomic.py        files written whole or not at all
    turns.py         the playground's turns at the model: generations at once, and a queue for the rest
    connections.py   the playground's connections: held by an event loop until the request is in, then a thread each
    playground.html  the page serve.py serves

The network itself is model.py at the top, as the lecture writes it; nothing here is needed
to read it.
"""
