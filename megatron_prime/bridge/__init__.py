from megatron_prime.platform.megatron_import import import_megatron_core

import_megatron_core()
