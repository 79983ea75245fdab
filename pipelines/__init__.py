"""diffusers pipelines of the project (``LGQPipeline``)."""
from pipelines.pipeline_lgq import LGQPipeline

__all__ = ["LGQPipeline"]
