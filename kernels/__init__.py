"""Frugal's hot paths. Triton kernels for quantized inference (`w4a16`, `kv_int8`, `attention_int8`), each next
to its plain-torch reference and a CPU path (`dispatch` picks), and the one door to torch's private native CPU
kernels for INT8/INT4 matmuls, with their preconditions checked (`native`)."""
