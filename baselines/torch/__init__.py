"""PyTorch baseline of saljax: the same models and losses, written as their authors' code works.

Modules and the interpreter each one runs in:
  layout   pure numpy: saljax (NHWC, HWIO, flax names) <-> PyTorch (NCHW, OIHW, state_dict names);
           importable from both interpreters, the one place where layouts are converted
  models   torch SimpleCNN, ResNet18, ResNet50 (torch interpreter)
  losses   torch CE, GradMask, RRR, CYBORG, Divisive Decisions, presets (torch interpreter);
           xil_losses the comparison methods (RBR, RRR-G, HINT, ActDiff, SGT, counterexamples, CDEP),
           _loss_base their shared forward pass, Term, Loss and combine;
           decomposition the contextual decomposition CDEP needs (SimpleCNN, XILCNN, MLP)
  run      `python -m baselines.torch.run IN.npz OUT.npz`: evaluates loss cases (torch interpreter)
  bridge   runs `run` from the saljax interpreter through $SALJAX_TORCH_PYTHON and compares results

Nothing here is imported on `import baselines.torch`, so the saljax interpreter (no torch) and the
torch interpreter (no jax) can both import the parts they need.
"""
