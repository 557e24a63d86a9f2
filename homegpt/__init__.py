"""
homegpt's library: what the commands at the top of the checkout (train.py, sample.py, eval.py, ...)
are made of. Imported, never run; no module here imports a command.

    from homegpt.checkpoint import read_checkpoint
    from homegpt.weights import load_model
"""
