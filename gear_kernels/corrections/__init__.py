"""GEAR's corrections, stages that compose with any quantizer (DESIGN.md section 2): sparse
outliers S kept exactly, taken out before quantization, and a low-rank L of what remains of
the quantization error. X ~ D + L, with S written over it."""
