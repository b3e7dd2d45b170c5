"""The numerical core: layers, the network, optimizers, schedules and the gradient check.

Pure NumPy: nothing here imports the rest of klayer or reads a file. Read it in this
order: :mod:`klayer.nn.layers` (each layer's forward and backward pass),
:mod:`klayer.nn.network` (the k-layer network, its cost and gradients),
:mod:`klayer.nn.gradcheck` (analytic gradients against centred differences), then
:mod:`klayer.nn.optim` and :mod:`klayer.nn.schedules` (how training moves the weights).
"""
