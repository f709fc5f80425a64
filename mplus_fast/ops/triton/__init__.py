"""Triton kernels (GPU path; CPU only under TRITON_INTERPRET=1). Imported lazily, never at package import."""
