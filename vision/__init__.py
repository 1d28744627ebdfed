"""Images to states: tiling and preprocessing, the ViT image encoder."""
from vision.encoder import ImageEncoder, VisionConfig
from vision.transforms import ImageProcessor, load_image

__all__ = ["ImageEncoder", "VisionConfig", "ImageProcessor", "load_image"]
