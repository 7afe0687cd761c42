"""Where the ranks run: tensor-parallel groups as Ray actors (placement, nodes, metrics) or
under torchrun, behind one pool interface."""
