"""A worked example of the fused importance clone loss on a small CNN layer.

Teacher activations, their CE gradients, per-channel statistics, and a clone's activations go in;
a loss comes out whose gradient reaches only the clone. Compares the fused C++ kernel with the
plain PyTorch reference.
"""
import time

import torch

import medic_fast

torch.manual_seed(0)
teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(16 * 32 * 32, 10))
clone = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.Flatten(), torch.nn.Linear(16 * 32 * 32, 10))
x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))

# Teacher activations of the conv layer, and d CE / d activations (teacher frozen).
acts_t = teacher[0](x).detach().requires_grad_()
ce = torch.nn.functional.cross_entropy(teacher[1:](acts_t), y)
(grads,) = torch.autograd.grad(ce, acts_t)
acts_t = acts_t.detach()
mean, std = acts_t.mean(dim=(0, 2, 3)), acts_t.std(dim=(0, 2, 3))  # per-channel statistics

acts_c = clone[0](x)
medic_fast.importance_clone_loss(acts_t, acts_c.detach(), grads)  # builds/loads the extension
for backend in ("cpp", "reference"):
    start = time.perf_counter()
    loss = medic_fast.importance_clone_loss(acts_t, acts_c, grads, mean, std, tau=5.0,
                                            backend=backend)
    (g,) = torch.autograd.grad(loss, acts_c)
    ms = (time.perf_counter() - start) * 1e3
    print(f"{backend:9s} loss={loss.item():.6f}  |grad|={g.norm().item():.6f}  {ms:.1f} ms")

w = medic_fast.importance_weights(acts_t, grads, mean, std, tau=5.0)
top = w.flatten(1).max(dim=1).values.mean().item()
print(f"importance weights: sum per sample <= 1, largest weight on average {top:.4f} "
      f"(uniform would be {1 / w[0].numel():.2e})")
