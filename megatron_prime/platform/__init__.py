import warnings

# megatron-core warns at import time about optional Apex / Transformer Engine kernels that it
# replaces with torch ones; the README documents that both are optional.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*(not installed|is not installed)")
warnings.filterwarnings("ignore", message=r"Apex is not installed")
