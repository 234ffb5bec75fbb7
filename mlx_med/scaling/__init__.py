"""Scaling-law studies: IsoFLOP sweeps (`sweep`), power-law fits (`fit`), plots (`plots`)
and the study report (`report`). `mlx-med scaling run|fit|report` is the command line."""
