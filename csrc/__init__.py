"""C++/CUDA sources of the extension ``medic_fast._C``, installed with the package so that the
first use (or ``python -m medic_fast.build``) can compile them with ninja."""
