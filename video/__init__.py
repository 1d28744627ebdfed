"""Video to states: frame decoding and uniform sampling (PyAV), per-frame preprocessing, and the
temporal aggregator that merges runs of frames before the video cross-attention."""
from video.aggregator import TemporalAggregator, VideoConfig
from video.frames import FrameProcessor, VideoClip, load_video, video_from_bytes, write_video

__all__ = ["FrameProcessor", "TemporalAggregator", "VideoClip", "VideoConfig", "load_video", "video_from_bytes",
           "write_video"]
