"""GPT-OSS: config, modules, checkpoint io (bf16 and MXFP4), random init at real shapes, a tiny model for tests."""

from ossrl.model.config import GptOssConfig
from ossrl.model.gpt_oss import GptOss, PackedBatch, pack_batch
from ossrl.model.mxfp4 import MXFP4Weight

__all__ = ["GptOss", "GptOssConfig", "MXFP4Weight", "PackedBatch", "pack_batch"]
