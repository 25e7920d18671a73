"""LARS (You, Gitman, Ginsburg 2017), as MAE's util/lars.py: SGD with momentum whose update of every weight
matrix is rescaled by trust_coefficient * ||w|| / ||grad + weight_decay * w||; 1-D parameters (biases, norms)
get plain momentum SGD without weight decay. MAE trains its linear probe with it at batch 16384."""
import torch


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                update = param.grad
                if update is None:
                    continue
                if param.ndim > 1:  # not a bias or a normalisation parameter
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(param), torch.norm(update)
                    one = torch.ones_like(param_norm)
                    # no host sync: the trust ratio stays on the device (1 where either norm is 0)
                    ratio = torch.where(param_norm > 0.0, torch.where(
                        update_norm > 0, group["trust_coefficient"] * param_norm / update_norm, one), one)
                    update = update.mul(ratio)
                state = self.state[param]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(param)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                param.add_(mu, alpha=-group["lr"])
        return loss
