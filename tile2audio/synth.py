"""Built-in synthetic demo data: a few music / sound-scene "styles" to learn without labels.

A style is defined mostly by its temporal structure: tempo, metre, onset and percussion
pattern, note durations and envelopes (plucked, sustained, gliding, bell-like), how
densely events follow each other. Pitch ranges overlap, and every style plays the same
bank of instruments. Nuisance variation is large, at two levels:

* per clip: loudness (-24 to -3 dBFS peak), transposition, tempo jitter, noise level;
* per section (1.5-4 s stretches inside a clip): instrument, key (+-3 semitones),
  loudness, a two-band EQ tilt, background-noise level and colour, and in about half
  the sections a quieter layer of another style.

The rhythm stays constant through a clip while the section-level nuisance changes, so a
Tile2Vec encoder (anchor and neighbour from one clip) is pushed to keep the rhythm and
drop the nuisance, whereas a random-weight encoder keeps both; global spectral averages
alone separate the classes only partly (about 80 % with a linear probe).

Each style has four simulated "artists" (the manifest ``group``) sharing tempo,
register, pattern variant, percussion and noise colour, so grouped splits are harder
than random ones.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import scipy.fft
import scipy.signal
import soundfile as sf
from tqdm.auto import tqdm

from . import atomic
from .console import show_progress
from .errors import Tile2AudioError

log = logging.getLogger(__name__)

ARTISTS_PER_STYLE = 4
_TABLE_SIZE = 4096
_SECTION_TRANSPOSE = 3
_SECTION_GAIN_DB = 5.0
_SECTION_NOISE_DB = 10.0
_SECTION_EQ_DB = 9.0
_SECTION_OTHER_PROB = 0.5    # chance a section carries a quieter layer of another style
_GENERATOR_VERSION = 1

# Harmonic amplitude profiles shared by all styles (index = timbre id).
_TIMBRES = (
    np.array([1.0, 0.15, 0.05]),                                   # soft sine
    1.0 / np.arange(1, 13),                                        # saw
    np.array([1.0 / k if k % 2 else 0.0 for k in range(1, 13)]),   # square
    np.array([1.0, 0.0, 0.6, 0.0, 0.4, 0.3, 0.0, 0.3]),            # organ
    np.arange(1, 11) ** -0.6,                                      # bright
    np.array([0.3, 1.0, 0.2, 0.5, 0.1, 0.2]),                      # hollow (strong 2nd)
)


@dataclass(frozen=True)
class _Artist:
    """Settings one simulated artist shares across all its clips."""

    pitch: float       # base MIDI note
    tempo: float       # beats per minute
    variant: int       # rhythm-pattern variant
    percussion: bool   # whether the artist adds (style-specific) percussion
    noise_colour: float  # spectral slope exponent of the background noise


@dataclass(frozen=True)
class _Style:
    """How a style's events are made: tempo and pitch ranges, percussion, pattern."""

    name: str
    tempo: tuple[float, float]
    pitch: tuple[float, float]
    percussion_prob: float
    events: Callable[[np.random.Generator, _Artist, float, float], list]


# An event: (onset s, duration s, midi or 0, amplitude, voice, extra). Voices: "pluck"
# (fast attack, decays), "pad" (slow attack, sustained), "glide" (pitch slide), "bell"
# (inharmonic, long decay), "kick", "snare", "hat".

_SCALE = np.array([0, 2, 4, 5, 7, 9, 11])  # major scale degrees, in semitones
_PROGRESSIONS = ((0, 3, 4, 0), (0, 5, 3, 4), (0, 4, 5, 3), (5, 3, 0, 4))


def _degree(root_degree: int, step: int) -> int:
    """Semitones of scale degree ``root_degree + step`` (wraps into higher octaves)."""
    d = root_degree + step
    return int(_SCALE[d % 7] + 12 * (d // 7))


def _chord_roots(rng: np.random.Generator, n_bars: int, bars_per_chord: int) -> list[int]:
    """Scale-degree root of every bar, following one of a few progressions."""
    prog = _PROGRESSIONS[rng.integers(len(_PROGRESSIONS))]
    return [prog[(b // bars_per_chord) % len(prog)] for b in range(n_bars)]


def _pulse_events(rng: np.random.Generator, a: _Artist, tempo: float, seconds: float) -> list:
    """Four-on-the-floor electronic loop: kick every beat, off-beat hats, short stabs."""
    step = 60.0 / tempo / 4
    n_bars = int(np.ceil(seconds / (16 * step)))
    stabs = ((0, 3, 6, 10, 12), (2, 5, 8, 11, 14), (0, 3, 7, 10, 13), (1, 4, 6, 9, 12, 14))[a.variant % 4]
    roots = _chord_roots(rng, n_bars, 2)
    ev = []
    for b in range(n_bars):
        t0 = b * 16 * step
        section_drop = (b // 4) % 3 == 2 and rng.random() < 0.6  # breakdown: no kick
        for s in range(0, 16, 4):
            if not section_drop:
                ev.append((t0 + s * step, 0.3, 0, 1.0, "kick", None))
            if a.percussion:
                ev.append((t0 + (s + 2) * step, 0.05, 0, 0.35, "hat", None))
        for s in stabs:
            if rng.random() < 0.9:
                midi = a.pitch + _degree(roots[b], int(rng.choice([0, 2, 4, 7])))
                ev.append((t0 + s * step, 0.8 * step, midi, 0.6, "pluck", None))
    return ev


def _waltz_events(rng: np.random.Generator, a: _Artist, tempo: float, seconds: float) -> list:
    """Three-four time: long bass note on one, short chords on two and three, a melody."""
    beat = 60.0 / tempo
    n_bars = int(np.ceil(seconds / (3 * beat)))
    roots = _chord_roots(rng, n_bars, 1 + a.variant % 2)
    ev = []
    for b in range(n_bars):
        t0 = b * 3 * beat
        jitter = rng.normal(0, 0.02 * beat, 3)  # rubato
        ev.append((t0 + jitter[0], 0.9 * beat, a.pitch - 12 + _degree(roots[b], 0), 0.9, "pluck", None))
        for k in (1, 2):
            for st in (2, 4):
                ev.append((t0 + k * beat + jitter[k], 0.45 * beat, a.pitch + _degree(roots[b], st), 0.35, "pluck", None))
            if a.percussion:
                ev.append((t0 + k * beat + jitter[k], 0.08, 0, 0.2, "hat", None))
        durs = ((3,), (2, 1), (1, 2), (1, 1, 1))[rng.integers(4)]
        t = t0
        for d in durs:
            midi = a.pitch + 12 + _degree(roots[b], int(rng.integers(0, 7)))
            ev.append((t, d * beat * 0.95, midi, 0.55, "pad" if d >= 2 else "pluck", 0.05))
            t += d * beat
    return ev


def _drone_events(rng: np.random.Generator, a: _Artist, tempo: float, seconds: float) -> list:
    """Ambient: few, long, overlapping swelling notes; optional slow wind swells."""
    ev = []
    t = -rng.uniform(0, 2.0)
    gap = 60.0 / tempo * (2 + a.variant % 3)  # "tempo" sets how often notes change
    root = a.pitch - 12
    while t < seconds:
        dur = rng.uniform(2.5, 3.5) * gap
        midi = root + _degree(0, int(rng.choice([0, 2, 4, 7, 9])))
        ev.append((max(t, 0.0), dur, midi, 0.6, "pad", rng.uniform(0.6, 1.5)))
        t += gap * rng.uniform(0.7, 1.3)
    if a.percussion:
        for t in np.arange(0, seconds, rng.uniform(3, 6)):
            ev.append((float(t), rng.uniform(2, 4), 0, 0.25, "wind", None))
    return ev


def _broken_events(rng: np.random.Generator, a: _Artist, tempo: float, seconds: float) -> list:
    """Swung, syncopated drums with ghost notes, a walking bass, fills every four bars."""
    step = 60.0 / tempo / 4
    swing = 0.15 + 0.1 * (a.variant % 2)  # delay of the off 16ths, in steps
    kicks = ((0, 7, 10), (0, 3, 10, 11), (0, 6, 9), (0, 10, 13))[a.variant % 4]
    n_bars = int(np.ceil(seconds / (16 * step)))
    roots = _chord_roots(rng, n_bars, 1)
    ev = []
    walk = 0
    for b in range(n_bars):
        t0 = b * 16 * step
        fill = b % 4 == 3
        for s in range(16):
            t = t0 + (s + (swing if s % 2 else 0.0)) * step
            if s in kicks and not (fill and s > 8):
                ev.append((t, 0.25, 0, 0.9, "kick", None))
            if s in (4, 12) or (fill and s >= 12) or rng.random() < 0.12:
                ev.append((t, 0.15, 0, 0.8 if s in (4, 12) else 0.3, "snare", None))
            if s % 2 == 0 and rng.random() < 0.8:
                ev.append((t, 0.04, 0, 0.25, "hat", None))
        for k in range(4):
            walk = int(np.clip(walk + rng.choice([-2, -1, 1, 2]), -3, 5))
            ev.append((t0 + 4 * k * step, 3.6 * step, a.pitch - 12 + _degree(roots[b], walk), 0.7, "pluck", None))
    return ev


def _arpeggio_events(rng: np.random.Generator, a: _Artist, tempo: float, seconds: float) -> list:
    """A continuous stream of sixteenth notes through chord tones, changing chord per bar."""
    step = 60.0 / tempo / 4
    n_bars = int(np.ceil(seconds / (16 * step)))
    roots = _chord_roots(rng, n_bars, 1)
    shapes = ((0, 2, 4, 7), (0, 4, 2, 7, 4, 9), (7, 4, 2, 0), (0, 2, 4, 7, 9, 7, 4, 2))
    ev = []
    for b in range(n_bars):
        shape = shapes[(a.variant + (b // 4) * (rng.random() < 0.3)) % len(shapes)]
        octave = 12 * int(rng.random() < 0.2)  # occasional register change
        for s in range(16):
            midi = a.pitch + octave + _degree(roots[b], shape[s % len(shape)])
            ev.append((b * 16 * step + s * step, 1.5 * step, midi, 0.5 + 0.1 * (s % 4 == 0), "pluck", None))
    return ev


def _chatter_events(rng: np.random.Generator, a: _Artist, tempo: float, seconds: float) -> list:
    """Speech-like scene: phrases of 3-6 Hz gliding syllables separated by pauses."""
    ev = []
    t = rng.uniform(0, 0.5)
    rate = tempo / 30.0  # syllables per second
    while t < seconds:
        for _ in range(int(rng.integers(3, 10))):
            dur = rng.uniform(0.5, 1.0) / rate
            start = a.pitch + rng.normal(0, 2)
            ev.append((t, dur, start, rng.uniform(0.4, 0.8), "glide", start + rng.normal(-2, 2)))
            t += dur * rng.uniform(1.0, 1.4)
        t += rng.uniform(0.3, 1.2)
    return ev


def _bell_events(rng: np.random.Generator, a: _Artist, tempo: float, seconds: float) -> list:
    """Sparse, irregular bell strikes with long inharmonic decays."""
    ev = []
    t = rng.uniform(0, 0.5)
    while t < seconds:
        ev.append((t, rng.uniform(1.5, 3.0), a.pitch + 12 + _degree(0, int(rng.integers(0, 8))),
                   rng.uniform(0.5, 1.0), "bell", None))
        t += 60.0 / tempo * rng.uniform(1.0, 3.0)
    return ev


def _rain_events(rng: np.random.Generator, a: _Artist, tempo: float, seconds: float) -> list:
    """Dense random noise ticks (Poisson) with occasional louder drips; no melody."""
    rate = tempo / 4.0  # ticks per second
    n = rng.poisson(rate * seconds)
    ev = [(float(t), 0.02, 0, rng.uniform(0.05, 0.3), "hat", None) for t in rng.uniform(0, seconds, n)]
    for t in rng.uniform(0, seconds, rng.poisson(seconds / 1.5)):
        ev.append((float(t), 0.15, a.pitch + 24 + rng.normal(0, 3), 0.4, "pluck", None))
    return ev


STYLES: tuple[_Style, ...] = (
    _Style("pulse", (118, 132), (55, 67), 0.75, _pulse_events),
    _Style("waltz", (78, 100), (55, 67), 0.4, _waltz_events),
    _Style("drone", (50, 80), (52, 64), 0.5, _drone_events),
    _Style("broken", (84, 104), (52, 64), 1.0, _broken_events),
    _Style("arpeggio", (96, 128), (57, 69), 0.0, _arpeggio_events),
    _Style("chatter", (120, 170), (52, 62), 0.0, _chatter_events),
    _Style("bells", (50, 90), (60, 70), 0.0, _bell_events),
    _Style("rain", (120, 200), (60, 72), 0.0, _rain_events),
)


# --------------------------------------------------------------------------- rendering


def _wavetables() -> list[np.ndarray]:
    """One period of each timbre, peak-normalised, shape (_TABLE_SIZE,)."""
    phase = np.arange(_TABLE_SIZE) / _TABLE_SIZE
    tables = []
    for amps in _TIMBRES:
        k = np.arange(1, len(amps) + 1)[:, None]
        wave = (amps[:, None] * np.sin(2 * np.pi * k * phase)).sum(axis=0)
        tables.append((wave / np.abs(wave).max()).astype(np.float32))
    return tables


_TABLES = _wavetables()
_BELL_PARTIALS = np.array([1.0, 2.76, 5.40, 8.93])
_BELL_AMPS = np.array([1.0, 0.6, 0.35, 0.2])


def _midi_hz(midi: float) -> float:
    """MIDI note number to Hz."""
    return 440.0 * 2.0 ** ((midi - 69.0) / 12.0)


def _envelope(n: int, sr: int, dur: float, voice: str, attack: float | None) -> np.ndarray:
    """Amplitude envelope of one note: pluck decays, pad swells and holds; 30 ms release."""
    t = np.arange(n, dtype=np.float32) / sr
    if voice == "pad":
        att = attack or 0.2
        env = np.minimum(t / att, 1.0)
    else:
        env = np.minimum(t / 0.004, 1.0) * np.exp(-t / max(0.35 * dur, 0.02))
    release = np.clip((dur + 0.03 - t) / 0.03, 0.0, 1.0)
    return (env * release).astype(np.float32)


def _render_event(ev: tuple, sr: int, table: np.ndarray, noise: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Samples of one event (its onset is applied by the caller)."""
    _, dur, midi, amp, voice, extra = ev
    n = max(int((dur + 0.03) * sr), 1)
    t = np.arange(n, dtype=np.float32) / sr
    if voice in ("pluck", "pad"):
        idx = ((_midi_hz(midi) * t) % 1.0 * _TABLE_SIZE).astype(np.int64)
        return amp * table[idx] * _envelope(n, sr, dur, voice, extra)
    if voice == "glide":
        freq = np.linspace(_midi_hz(midi), _midi_hz(extra), n, dtype=np.float32)
        idx = (np.cumsum(freq / sr) % 1.0 * _TABLE_SIZE).astype(np.int64)
        return amp * table[idx] * np.sin(np.pi * np.arange(n) / n).astype(np.float32)
    if voice == "bell":
        f = _midi_hz(midi) * _BELL_PARTIALS[:, None]
        decay = np.exp(-t[None, :] / (dur / (1 + np.arange(4)[:, None])))
        return amp * 0.5 * (_BELL_AMPS[:, None] * np.sin(2 * np.pi * f * t[None, :]) * decay).sum(axis=0)
    if voice == "kick":
        phase = 2 * np.pi * np.cumsum(50 + 90 * np.exp(-t / 0.03)) / sr
        return amp * np.sin(phase) * np.exp(-t / 0.12)
    if len(noise) > n:
        start = int(rng.integers(0, len(noise) - n))
        burst = noise[start:start + n]
    else:
        burst = np.resize(noise, n)  # a burst longer than the noise buffer repeats it
    if voice == "hat":
        burst = np.diff(burst, prepend=0.0)  # first difference: bright, hi-hat-like
        return amp * burst * np.exp(-t / max(dur, 0.01))
    if voice == "snare":
        return amp * (0.7 * burst + 0.3 * np.sin(2 * np.pi * 190 * t)) * np.exp(-t / 0.07)
    # wind: slowly swelling noise
    return amp * burst * np.sin(np.pi * np.arange(n) / n) ** 2


def _coloured_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Unit-RMS noise with power spectrum ~ 1 / f**exponent (0 white, 1 pink, 2 brown)."""
    size = scipy.fft.next_fast_len(n, real=True)  # section lengths are arbitrary; FFTs of primes crawl
    spec = np.fft.rfft(rng.standard_normal(size))
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0
    y = np.fft.irfft(spec / f ** (exponent / 2), size)[:n]
    return (y / (np.sqrt(np.mean(y**2)) + 1e-12)).astype(np.float32)


def _clip_facts(artist: _Artist, style_idx: int, clip: int, seed: int) -> dict:
    """Per-clip nuisance variation (drawn from its own stream so it is known without rendering)."""
    rng = np.random.default_rng([seed, 2, style_idx, clip])
    return {"tempo_bpm": round(float(artist.tempo * rng.uniform(0.95, 1.05)), 2),
            "transpose": int(rng.integers(-4, 5)),
            "gain_db": round(float(rng.uniform(-24, -3)), 2),
            "snr_db": round(float(rng.uniform(6, 35)), 2)}


@dataclass(frozen=True)
class _Section:
    """Within-clip variation: a stretch of a clip with its own instrument, key and levels."""

    start: float       # seconds
    timbre: int
    transpose: int     # semitones
    gain_db: float
    noise_db: float    # background noise offset
    low_db: float      # gain below ~350 Hz (EQ tilt)
    high_db: float     # gain above ~350 Hz
    noise_colour: float
    other_style: int   # index into STYLES of a quieter second layer, or -1
    other_db: float    # level of that layer relative to the main one


def _sections(rng: np.random.Generator, seconds: float) -> list[_Section]:
    """Split a clip into 1.5-4 s sections; each has its own instrument, key, levels, EQ, noise."""
    out = []
    t = 0.0
    while t < seconds:
        out.append(_Section(
            start=t,
            timbre=int(rng.integers(len(_TIMBRES))),
            transpose=int(rng.integers(-_SECTION_TRANSPOSE, _SECTION_TRANSPOSE + 1)),
            gain_db=float(np.clip(rng.normal(0, _SECTION_GAIN_DB), -2 * _SECTION_GAIN_DB, 2 * _SECTION_GAIN_DB)),
            noise_db=float(rng.uniform(-_SECTION_NOISE_DB, _SECTION_NOISE_DB)),
            low_db=float(rng.uniform(-_SECTION_EQ_DB, _SECTION_EQ_DB)),
            high_db=float(rng.uniform(-_SECTION_EQ_DB, _SECTION_EQ_DB)),
            noise_colour=float(rng.uniform(0.0, 2.0)),
            other_style=int(rng.integers(len(STYLES))) if rng.random() < _SECTION_OTHER_PROB else -1,
            other_db=float(rng.uniform(-12.0, -3.0)),
        ))
        t += float(rng.uniform(1.5, 4.0))
    return out


def _section_curve(sections: list[_Section], values: np.ndarray, n: int, sr: int) -> np.ndarray:
    """Piecewise-constant per-section values with 0.1 s linear ramps, sampled at n points."""
    starts = np.array([s.start for s in sections])
    knots = np.concatenate([[0.0], np.repeat(starts[1:], 2) + np.tile([0.0, 0.1], len(starts) - 1)])
    vals = np.concatenate([[values[0]], np.stack([values[:-1], values[1:]], axis=1).ravel()])
    return np.interp(np.arange(n) / sr, knots, vals).astype(np.float32)


def _section_eq(y: np.ndarray, sections: list[_Section], sr: int) -> np.ndarray:
    """Per-section two-band EQ (one-pole split at ~350 Hz), crossfaded between sections."""
    a = float(np.exp(-2 * np.pi * 350.0 / sr))
    low = scipy.signal.lfilter([1 - a], [1, -a], y).astype(np.float32)
    n = len(y)
    g_low = 10 ** (_section_curve(sections, np.array([s.low_db for s in sections]), n, sr) / 20)
    g_high = 10 ** (_section_curve(sections, np.array([s.high_db for s in sections]), n, sr) / 20)
    return g_low * low + g_high * (y - low)


def _section_noise(rng: np.random.Generator, sections: list[_Section], base_colour: float, n: int,
                   sr: int) -> np.ndarray:
    """Unit-RMS background noise whose colour changes from section to section."""
    out = np.zeros(n, dtype=np.float32)
    starts = [int(s.start * sr) for s in sections] + [n]
    for sec, a, b in zip(sections, starts[:-1], starts[1:]):
        if b > a:
            out[a:b] = _coloured_noise(rng, b - a, 0.5 * (base_colour + sec.noise_colour))
    return out


def _other_layers(rng: np.random.Generator, sections: list[_Section], seconds: float) -> list:
    """Events of the quieter second layers, each confined to its section; (event, level dB)."""
    out = []
    ends = [s.start for s in sections[1:]] + [seconds]
    for sec, end in zip(sections, ends):
        if sec.other_style < 0:
            continue
        style = STYLES[sec.other_style]
        guest = _Artist(float(rng.uniform(*style.pitch)), float(rng.uniform(*style.tempo)),
                        int(rng.integers(4)), bool(rng.random() < 0.5), 1.0)
        for ev in style.events(rng, guest, guest.tempo, seconds):
            if sec.start <= ev[0] < end:
                out.append((ev, sec.other_db))
    return out


def _render_clip(style: _Style, artist: _Artist, facts: dict, rng: np.random.Generator, seconds: float,
                 sr: int) -> np.ndarray:
    """One clip of a style by an artist with the clip's nuisance ``facts``; float32 (n,)."""
    n = int(round(seconds * sr))
    tempo = facts["tempo_bpm"]
    shifted = _Artist(artist.pitch + facts["transpose"], tempo, artist.variant,
                      artist.percussion, artist.noise_colour)
    events = style.events(rng, shifted, tempo, seconds)
    sections = _sections(rng, seconds)
    starts = np.array([s.start for s in sections])
    out = np.zeros(n + sr * 8, dtype=np.float32)  # room for tails; trimmed below
    white = rng.standard_normal(sr * 4).astype(np.float32)
    layers = [(ev, 0.0) for ev in events] + _other_layers(rng, sections, seconds)
    for ev, extra_db in layers:
        start = max(int(ev[0] * sr), 0)
        if start >= n:
            continue
        sec = sections[int(np.searchsorted(starts, ev[0], side="right")) - 1]
        if ev[2]:
            ev = (ev[0], ev[1], ev[2] + sec.transpose, *ev[3:])
        gain = 10 ** ((rng.normal(0, 1.5) + sec.gain_db + extra_db) / 20)
        seg = _render_event(ev, sr, _TABLES[sec.timbre], white, rng) * np.float32(gain)
        out[start:start + len(seg)] += seg[: len(out) - start]
    y = _section_eq(out[:n], sections, sr)
    y /= np.abs(y).max() + 1e-9
    rms = np.sqrt(np.mean(y**2)) + 1e-9
    noise_db = _section_curve(sections, np.array([s.noise_db for s in sections]), n, sr)
    y += _section_noise(rng, sections, artist.noise_colour, n, sr) * rms * 10 ** ((noise_db - facts["snr_db"]) / 20)
    y *= np.float32(10 ** (facts["gain_db"] / 20)) / (np.abs(y).max() + 1e-9)
    return np.clip(y, -1.0, 1.0)


def _make_artist(style: _Style, style_idx: int, k: int, seed: int) -> _Artist:
    """The shared settings of artist ``k`` of a style (deterministic in the seed)."""
    rng = np.random.default_rng([seed, 1, style_idx, k])
    return _Artist(
        pitch=float(rng.integers(int(style.pitch[0]), int(style.pitch[1]) + 1)),
        tempo=float(rng.uniform(*style.tempo)),
        variant=int(rng.integers(0, 4)),
        percussion=bool(rng.random() < style.percussion_prob),
        noise_colour=float(rng.choice([0.0, 1.0, 2.0])),
    )


# --------------------------------------------------------------------------- dataset


def make_demo_dataset(
    out_dir: str | os.PathLike,
    n_classes: int = 5,
    clips_per_class: int = 20,
    seconds: float = 10.0,
    sample_rate: int = 22050,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write a labelled synthetic audio dataset and its manifest.

    Files are ``out_dir/audio/<style>/<style>_<NNN>.wav`` (16-bit PCM, mono) and
    ``out_dir/manifest.csv`` in the manifest schema (clip_id, path, root, label, split,
    fold, group) plus the extras tempo_bpm, transpose, gain_db, snr_db. The label is the
    style; the group is one of four simulated artists per style. Deterministic in
    ``seed``; a rerun with the same arguments leaves complete files untouched.

    Parameters
    ----------
    out_dir : path
        Output folder (created).
    n_classes : int
        Number of styles, 2 to ``len(STYLES)`` (8): pulse, waltz, drone, broken,
        arpeggio, chatter, bells, rain, in that order.
    clips_per_class : int
        Clips per style (spread over the style's four artists).
    seconds : float
        Clip length.
    sample_rate : int
        Sample rate of the files in Hz.
    seed : int
        Random seed.
    progress : bool
        Show a tqdm bar over clips.

    Returns
    -------
    pathlib.Path
        The manifest CSV path.
    """
    if not 2 <= n_classes <= len(STYLES):
        raise Tile2AudioError(f"n_classes must be between 2 and {len(STYLES)}, got {n_classes}")
    if clips_per_class < 1 or seconds <= 0 or sample_rate < 8000:
        raise Tile2AudioError("clips_per_class must be >= 1, seconds > 0 and sample_rate >= 8000")
    out_dir = Path(out_dir).expanduser().absolute()
    audio_dir = out_dir / "audio"
    settings = {"version": _GENERATOR_VERSION, "n_classes": n_classes, "clips_per_class": clips_per_class,
                "seconds": float(seconds), "sample_rate": int(sample_rate), "seed": int(seed)}
    reuse = _same_settings(out_dir / "synth.json", settings)
    n_samples = int(round(seconds * sample_rate))
    rows = []
    written = 0
    jobs = [(si, c) for si in range(n_classes) for c in range(clips_per_class)]
    for si, c in tqdm(jobs, desc="synth", unit="clip", disable=not show_progress(progress)):
        style = STYLES[si]
        rel = f"{style.name}/{style.name}_{c:03d}.wav"
        artist_k = c % ARTISTS_PER_STYLE
        artist = _make_artist(style, si, artist_k, seed)
        facts = _clip_facts(artist, si, c, seed)
        path = audio_dir / rel
        if not (reuse and _complete(path, n_samples, sample_rate)):
            y = _render_clip(style, artist, facts, np.random.default_rng([seed, 3, si, c]), seconds, sample_rate)
            with atomic.atomic_path(path) as tmp:
                sf.write(str(tmp), y, sample_rate, subtype="PCM_16", format="WAV")
            written += 1
        rows.append({"clip_id": rel[:-4], "path": rel, "root": str(audio_dir), "label": style.name,
                     "split": "", "fold": "", "group": f"{style.name}_a{artist_k}", **facts})
    manifest = out_dir / "manifest.csv"
    _write_manifest(pd.DataFrame(rows), manifest)
    if not reuse:
        atomic.write_json(out_dir / "synth.json", settings)
    log.info("demo dataset in %s: %d clips, %d (re)generated", out_dir, len(rows), written)
    return manifest


def _same_settings(path: Path, settings: dict) -> bool:
    """True when an earlier run with the same arguments wrote this folder."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) == settings
    except (OSError, json.JSONDecodeError):
        return False


def _complete(path: Path, n_samples: int, sr: int) -> bool:
    """True when ``path`` is a readable WAV of the expected length and rate."""
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError):
        return False
    return info.frames == n_samples and info.samplerate == sr


def _write_manifest(df: pd.DataFrame, path: Path) -> None:
    """Write the manifest CSV atomically, unless the same text is already there."""
    text = df.to_csv(index=False)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    atomic.write_text(path, text)
