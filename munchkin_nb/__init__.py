__version__ = "0.1.0"

# libgomp (torch's OpenMP on Linux) spins 300,000 rounds for a descheduled partner thread before it
# sleeps: beside another busy process that made training 50x slower (nbs/14_cpu_speed.ipynb). It reads
# its settings once, when torch loads, so the package sets them here, before any module imports torch.
import os as _os, sys as _sys
torch_first = 'torch' in _sys.modules      # too late: libgomp has read its settings already
spin_default = not (torch_first or {'OMP_WAIT_POLICY', 'GOMP_SPINCOUNT'} & set(_os.environ))
if spin_default: _os.environ['GOMP_SPINCOUNT'] = '30000'
