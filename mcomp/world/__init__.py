"""A small synthetic multimodal world: one set of entities that every modality can express.

Entities are attribute combinations, shape x colour (cube, sphere, cone, cylinder, torus x red, orange,
yellow, green, cyan, blue, purple, black: `configs/world/attributes.yaml`). Every modality renders
both attributes, boldly enough for the tiny encoders (32 px ViT, short fbank clips, 256 points):

* image (PNG 64x64): the shape's flat-shaded icon in its colour; distractors size, position,
  rotation, background tint/gradient/noise (`render_image`);
* audio (WAV 16 kHz mono, 1 s): timbre from the shape (square, sine, sawtooth, pulsed, bell), pitch
  from the colour (x1.4 apart); distractors detune, loudness, onset, duration, noise (`render_audio`);
* video (MP4 mpeg4 64x64, 12 frames): the icon gliding across the frame; distractors direction,
  speed, spin, size, background (`render_video`);
* point cloud (binary PLY, 1024 points, xyz + rgb): points on the shape's open3d mesh in its colour;
  distractors scale, yaw, tilt, offset, jitter, colour noise (`render_point`).

Splits (seeded, `entities.split_entities`): 5 dev and 5 test entities in the full world (6 and 6 in
the test world) are held out of all modality training media (each held-out set has distinct colours
and every shape; training keeps every shape and colour), so held-out entities are new combinations
of known attributes.

Outputs of `generate_world(out_dir, size, seed)` (see `datasets`, `text`):
* `train/<modality>.json`: `mcomp train` data on training entities (captions, attribute questions,
  lettered questions); `val/<modality>.json`: the same on dev entities (held-out-entity accuracy);
* `text/commonality.json`, `text/attribute_qa.json`, `text/modality_qa.json`, `text/sentences.txt`:
  text-only corpora for the base LLM (commonality questions in the MCUB format and the modality
  questions, both with captions in place of media; attribute questions);
* `mcub/test` and `mcub/dev`: MCUB-style data roots (`data/test/MCUB-4.json`, `MCUB-3-<subset>.json`,
  `MCUB-answer.json`, `MCUB-meta.json`, `media/`). Questions have 4 options and balanced answer
  letters; "entity" questions (all inputs depict the same held-out entity, fresh renders with
  different distractors) and "attribute" questions (inputs of any entities sharing exactly one
  attribute, fresh renders; see `questions`). Weight search on `dev`, reporting on `test`;
* `labels.json` (media file -> entity) and `manifest.json` (`WorldManifest`: version, seed, size,
  config and digest, entity split, paths, counts, bytes and sha256 of every file).

The same seed and config give byte-identical files on the same software stack (every file has its own
seeded random stream; PNG/WAV/PLY carry no timestamps; MP4 is written with the `bitexact` flags).
"""

from mcomp.world.datasets import MCUB_SUBSETS
from mcomp.world.entities import MODALITIES, AttributeSpace, Entity, EntitySplit, load_attribute_space, split_entities
from mcomp.world.generate import CONVERSATION_CORPORA, WORLD_VERSION, WorldManifest, generate_world, load_world_config

__all__ = [
    "CONVERSATION_CORPORA",
    "MCUB_SUBSETS",
    "MODALITIES",
    "AttributeSpace",
    "Entity",
    "EntitySplit",
    "WORLD_VERSION",
    "WorldManifest",
    "generate_world",
    "load_attribute_space",
    "load_world_config",
    "split_entities",
]
