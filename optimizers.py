"""
Several torch optimizers over disjoint parameters, stepped as one: Muon for the blocks' matrices and
AdamW for the rest (GPT.configure_optimizers builds them).

    from optimizers import ChainedOptimizer
    opt = ChainedOptimizer(torch.optim.AdamW(groups_a), torch.optim.Muon(groups_b))
    opt.step(); opt.zero_grad(); sd = opt.state_dict()

Clipping, the GradScaler and the name-keyed checkpoints (checkpoint.optimizer_tensors) see one
optimizer: param_groups, state_dict() and load_state_dict() span all of them in order, numbered as
one torch optimizer numbers its parameters.
"""

OPTIMIZERS = ("adamw", "adamw8bit", "muon")  # the names train.py, bench.py and memory.py accept


def optimizer_problems(name, device):
    """What stops optimizer `name` on `device` ('auto', 'cpu', 'cuda', ...), as messages for a config
    check made before any work: an unknown name, or 8-bit AdamW without CUDA or bitsandbytes."""
    if name not in OPTIMIZERS:
        return [f"optimizer must be {', '.join(map(repr, OPTIMIZERS[:-1]))} or {OPTIMIZERS[-1]!r}, got {name!r}"]
    problems = []
    if name == "adamw8bit":
        import importlib.util
        import torch
        if str(device).split(":")[0] in ("cpu", "mps") or (device == "auto" and not torch.cuda.is_available()):
            problems.append("optimizer='adamw8bit' needs a CUDA GPU (bitsandbytes' 8-bit states); use optimizer='adamw'")
        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append("optimizer='adamw8bit' needs bitsandbytes: pip install bitsandbytes, or optimizer='adamw'")
    return problems


class ChainedOptimizer:
    """Several torch optimizers over disjoint parameters, stepped as one (see the module docstring)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self):
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        state, groups, offset = {}, [], 0
        for o in self.optimizers:
            sd = o.state_dict()
            state.update({i + offset: s for i, s in sd["state"].items()})
            groups += [g | {"params": [i + offset for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd):
        if len(sd["param_groups"]) != len(self.param_groups):
            raise ValueError(f"the state has {len(sd['param_groups'])} parameter groups, this optimizer "
                             f"{len(self.param_groups)}: it was saved by another optimizer")
        first_group, offset = 0, 0
        for o in self.optimizers:
            groups = sd["param_groups"][first_group:first_group + len(o.param_groups)]
            ids = [i for g in groups for i in g["params"]]
            o.load_state_dict({"state": {i - offset: sd["state"][i] for i in ids if i in sd["state"]},
                               "param_groups": [g | {"params": [i - offset for i in g["params"]]} for g in groups]})
            first_group += len(groups)
            offset += len(ids)
