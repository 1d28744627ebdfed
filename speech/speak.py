"""Speaking a reply with the espeak-ng synthesizer, when it is installed."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mm.errors import InputError


def speaker_problem() -> str | None:
    """Why replies can't be spoken here (None: they can)."""
    if shutil.which("espeak-ng") is None:
        return "espeak-ng is not installed, so the reply can't be spoken (Debian: apt-get install espeak-ng)"
    return None


def speak(text: str, out: str | Path, voice: str = "en-us", words_per_minute: int = 170) -> Path:
    """Synthesize `text` into the wav file `out`, atomically (a failed run leaves no partial file)."""
    problem = speaker_problem()
    if problem:
        raise InputError(out, problem)
    out = Path(out)
    if out.parent and not out.parent.is_dir():
        raise InputError(out, "its folder does not exist")
    fd, tmp = tempfile.mkstemp(suffix=".wav", dir=out.parent)
    os.close(fd)
    try:
        run = subprocess.run(["espeak-ng", "-v", voice, "-s", str(words_per_minute), "-w", tmp, "--", text or " "],
                             capture_output=True, text=True)
        if run.returncode != 0 or os.path.getsize(tmp) == 0:
            raise InputError(out, f"espeak-ng failed (voice {voice!r}): {run.stderr.strip() or run.returncode}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the reply is an ordinary file
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
