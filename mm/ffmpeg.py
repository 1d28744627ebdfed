"""FFmpeg (PyAV) exceptions as the project's one-line input errors, for video and audio alike."""
from __future__ import annotations

from contextlib import contextmanager

import av

from mm.errors import InputError

av.logging.set_level(av.logging.PANIC)  # problems reach the user as InputError, not FFmpeg's stderr

ARTICLE = {"video": "a video", "audio": "audio"}


@contextmanager
def ffmpeg_errors(name, kind: str):
    """Decoding inside this block: FFmpeg's exceptions -> InputError naming the input; the
    project's own InputErrors pass through unchanged. kind: "video" or "audio"."""
    try:
        yield
    except InputError:
        raise
    except av.error.InvalidDataError as e:
        raise InputError(name, f"not {ARTICLE[kind]} or corrupt ({e.strerror or e})") from None
    except av.error.EOFError:
        raise InputError(name, f"no decodable {kind} frames (the file ends before its first frame)") from None
    except av.error.DecoderNotFoundError as e:
        raise InputError(name, f"unsupported {kind} codec ({e})") from None
    except (av.error.FFmpegError, OSError, ValueError, MemoryError) as e:
        raise InputError(name, f"cannot decode {kind} ({e})") from None
