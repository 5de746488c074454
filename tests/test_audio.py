"""Audio adapters: decoding real files, fbank front-end vs direct torchaudio calls, BEATs and Q-Former
shapes/key names (tiny and published size), bad media, and the composed model on audio prompts."""

from __future__ import annotations

import math

import av
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from PIL import Image
from torchaudio.compliance import kaldi

from mcomp.encoders.audio import AudioAdapter, AudioAdapterConfig, DecodedAudio, load_audio
from mcomp.encoders.audio_hf import WhisperAudioAdapter, WhisperAudioAdapterConfig
from mcomp.encoders.beats import BEATs, BEATsConfig, relative_position_bucket
from mcomp.encoders.qformer import QFormerConfig, QFormerProjector, parse_qformer_type
from mcomp.errors import MediaBatchError, MediaError
from mcomp.io import save_tensors
from mcomp.resources import load_config
from mcomp.tiny import tiny_audio_adapter_config

SR44 = 44100


def _tone(freq: float, seconds: float, rate: int, amp: float = 0.3) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def _dominant_hz(mono: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    return float(np.fft.rfftfreq(len(mono), 1 / rate)[spectrum.argmax()])


def _write_mp4(path, samples: np.ndarray, rate: int) -> None:
    """AAC audio track in an mp4 (samples: [channels, n])."""
    layout = "stereo" if samples.shape[0] == 2 else "mono"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


def _write_video_only_mp4(path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    files = {}
    # 16 kHz mono float WAV: decoded samples are exactly these.
    files["tone_samples"] = _tone(1000, 1.5, 16000)
    files["wav"] = root / "tone_1k.wav"
    sf.write(files["wav"], files["tone_samples"], 16000, subtype="FLOAT")
    # Stereo 44.1 kHz 16-bit FLAC, different channels; keep the quantised samples for the reference.
    left, right = _tone(440, 2.0, SR44), (0.1 * rng.standard_normal(int(2.0 * SR44))).astype(np.float32)
    stereo = np.stack([left, right], axis=1)
    files["stereo_samples"] = (np.round(np.clip(stereo, -1, 1) * 32767) / 32768).astype(np.float32)
    files["flac"] = root / "stereo_44k.flac"
    sf.write(files["flac"], files["stereo_samples"], SR44, subtype="PCM_16")
    files["ogg"] = root / "tone_660.ogg"
    sf.write(files["ogg"], _tone(660, 1.0, 22050), 22050, format="OGG", subtype="VORBIS")
    files["mp3"] = root / "tone_880.mp3"
    sf.write(files["mp3"], _tone(880, 1.0, 22050), 22050, format="MP3")
    files["mp4"] = root / "clip_aac.mp4"
    _write_mp4(files["mp4"], np.stack([_tone(440, 1.0, 22050), _tone(440, 1.0, 22050)]), 22050)
    # Bad media.
    files["empty"] = root / "empty.wav"
    sf.write(files["empty"], np.zeros((0, 1), np.float32), 16000)
    files["corrupt"] = root / "corrupt.flac"
    files["corrupt"].write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files["corrupt_mp4"] = root / "corrupt.mp4"
    files["corrupt_mp4"].write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files["txt"] = root / "notes.txt"
    files["txt"].write_text("not audio")
    files["png"] = root / "picture.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(files["png"])
    files["png_as_wav"] = root / "picture_renamed.wav"
    files["png_as_wav"].write_bytes(files["png"].read_bytes())
    files["video_only"] = root / "video_only.mp4"
    _write_video_only_mp4(files["video_only"])
    return files


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    return AudioAdapter(tiny_audio_adapter_config(), llm_hidden_size=64).eval()


def _reference_fbank(mono: torch.Tensor, target_length: int) -> torch.Tensor:
    """The published recipe, called directly: x 2^15, kaldi fbank, normalise, then pad / truncate."""
    fb = kaldi.fbank(mono[None] * 32768, num_mel_bins=128, sample_frequency=16000, frame_length=25, frame_shift=10)
    fb = (fb - 15.41663) / (2 * 6.55582)
    out = torch.zeros(target_length, 128)
    n = min(target_length, fb.shape[0])
    out[:n] = fb[:n]
    return out


# --- decoding ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, rate, channels, seconds, hz",
    [
        ("wav", 16000, 1, 1.5, 1000),
        ("flac", SR44, 2, 2.0, 440),
        ("ogg", 22050, 1, 1.0, 660),
        ("mp3", 22050, 1, 1.0, 880),
        ("mp4", 22050, 2, 1.0, 440),
    ],
)
def test_decodes_each_format_from_disk(media, key, rate, channels, seconds, hz):
    audio = load_audio(str(media[key]))
    assert audio.sample_rate == rate and audio.waveform.shape[0] == channels
    assert audio.waveform.dtype == torch.float32 and audio.source == str(media[key])
    # Lossy codecs add encoder delay / padding (AAC: up to ~2 frames of 1024 samples).
    assert abs(audio.num_samples - seconds * rate) <= 2200
    assert abs(_dominant_hz(audio.waveform[0].numpy(), rate) - hz) < 5
    if key == "wav":
        assert np.array_equal(audio.waveform[0].numpy(), media["tone_samples"])


def test_stereo_44k_is_averaged_and_resampled_like_torchaudio(adapter, media):
    mono = adapter.waveform(adapter.load(str(media["flac"])))
    samples = torch.from_numpy(media["stereo_samples"])
    expected = AF.resample(samples.mean(dim=1), SR44, 16000)
    assert mono.shape == (math.ceil(samples.shape[0] * 16000 / SR44),) == (32000,)
    torch.testing.assert_close(mono, expected, atol=1e-6, rtol=0)
    # Channel 0 alone (the upstream choice for > 2 channels) is clearly different from the mix.
    assert (AF.resample(samples[:, 0], SR44, 16000) - mono).abs().max() > 0.05


def test_fbank_matches_direct_kaldi_call_truncated_and_padded(adapter, media):
    got = adapter.input_tensor(str(media["flac"]))  # tiny config: 128 frames, the clip has 198
    mono = AF.resample(torch.from_numpy(media["stereo_samples"]).mean(dim=1), SR44, 16000)
    assert got.shape == (128, 128)
    torch.testing.assert_close(got, _reference_fbank(mono, 128), atol=1e-4, rtol=0)
    published = AudioAdapterConfig().frontend()(mono)  # published length: 1024 frames, zero-padded
    reference = _reference_fbank(mono, 1024)
    assert published.shape == (1024, 128)
    torch.testing.assert_close(published, reference, atol=1e-4, rtol=0)
    frames = 1 + (32000 - 400) // 160  # snip_edges framing
    assert frames == 198 and published[frames:].abs().sum() == 0 and published[frames - 1].abs().sum() > 0


def test_tone_energy_lands_in_the_right_mel_bin(adapter, media):
    fbank = adapter.input_tensor(str(media["wav"]))  # 1 kHz tone, 150 frames -> 128 kept
    mel = lambda f: 1127 * math.log(1 + f / 700)  # noqa: E731  Kaldi mel scale
    low, high = mel(20), mel(8000)
    centres = [low + (i + 1) * (high - low) / 129 for i in range(128)]
    expected = min(range(128), key=lambda i: abs(centres[i] - mel(1000)))
    assert abs(int(fbank.mean(0).argmax()) - expected) <= 1


def test_in_memory_inputs_match_the_file_path(adapter, media):
    from_file = adapter.input_tensor(str(media["wav"]))
    pair = (media["tone_samples"], 16000)
    torch.testing.assert_close(adapter.input_tensor(pair), from_file)
    torch.testing.assert_close(
        adapter.input_tensor(DecodedAudio(torch.from_numpy(media["tone_samples"])[None], 16000)), from_file
    )
    assert adapter.input_tensor(from_file) is from_file  # already an fbank of the right shape
    with pytest.raises(MediaError, match="expected a file path, DecodedAudio or"):
        adapter.input_tensor(media["tone_samples"])  # no sample rate


# --- bad media --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, message",
    [
        ("empty", "empty \\(zero samples\\)"),
        ("corrupt", "unreadable or corrupt audio file"),
        ("corrupt_mp4", "unreadable or corrupt media file"),
        ("txt", "unsupported audio file type '.txt'"),
        ("png", "unsupported audio file type '.png'"),
        ("png_as_wav", "unreadable or corrupt audio file"),
        ("video_only", "no audio stream \\(streams: video\\)"),
    ],
)
def test_bad_media_raise_media_error_naming_the_file(adapter, media, key, message):
    with pytest.raises(MediaError, match=message) as err:
        adapter.input_tensor(str(media[key]))
    assert err.value.path == str(media[key]) and str(media[key]) in str(err.value)
    assert err.value.modality == "audio"


def test_missing_and_too_short_audio(adapter, media, tmp_path):
    with pytest.raises(MediaError, match="missing.wav.*file not found"):
        adapter.input_tensor(str(tmp_path / "missing.wav"))
    short = tmp_path / "click.wav"
    sf.write(short, np.ones(100, np.float32) * 0.1, 16000)
    with pytest.raises(MediaError, match="click.wav.*too short: 100 samples"):
        adapter.input_tensor(str(short))


def test_batch_names_exactly_the_failing_indices(adapter, media):
    with pytest.raises(MediaBatchError) as err:
        adapter.prepare([media["wav"], media["txt"], media["flac"], media["empty"], media["mp4"], media["video_only"]])
    assert list(err.value.failures) == [1, 3, 5]
    for i, key in ((1, "txt"), (3, "empty"), (5, "video_only")):
        assert err.value.failures[i].path == str(media[key])
    batch = adapter.prepare([media["wav"], media["flac"], media["mp4"]])
    assert batch.shape == (3, 128, 128)


# --- BEATs ------------------------------------------------------------------------------------
def test_relative_position_buckets():
    rel = torch.arange(-2000, 2001)
    buckets = relative_position_bucket(rel, 320, 800)
    assert buckets[2000] == 0  # distance 0
    assert torch.equal(buckets[2000 - 79 : 2000], torch.arange(79, 0, -1))  # exact range, keys before
    assert torch.equal(buckets[2001 : 2001 + 79], torch.arange(161, 240))  # keys after: upper half
    assert buckets.min() == 0 and buckets.max() == 319
    assert buckets[2000 + 800] == 319 and buckets[2000 - 800] == 159  # saturate at max_distance
    far = buckets[2000 + 80 :]
    assert bool((far[1:] >= far[:-1]).all())  # log buckets are monotone


def test_beats_tokens_are_time_major(adapter):
    """A single non-zero 16x16 patch at (time 3, freq 5) changes only token 3 * 8 + 5."""
    enc = adapter.encoder
    seen = {}
    handle = enc.layer_norm.register_forward_hook(lambda m, i, o: seen.setdefault("tokens", i[0]))
    fbank = torch.zeros(1, 128, 128)
    fbank[0, 3 * 16 : 4 * 16, 5 * 16 : 6 * 16] = 1.0
    with torch.no_grad():
        out = enc(fbank)
    handle.remove()
    tokens = seen["tokens"][0]
    changed = (tokens - tokens[0]).abs().sum(-1).nonzero().flatten().tolist()
    assert changed == [29] and out.shape == (1, 64, 32)


def test_upstream_checkpoint_layout_loads(tmp_path):
    """weight_g / weight_v keys, the bias table under every layer, training cfg fields, a classifier head."""
    torch.manual_seed(1)
    cfg = load_config("encoders", "tiny-beats.json")
    source = BEATs(BEATsConfig(**cfg)).eval()
    state = dict(source.state_dict())
    prefix = "encoder.pos_conv.0."
    state[prefix + "weight_g"] = state.pop(prefix + "parametrizations.weight.original0")
    state[prefix + "weight_v"] = state.pop(prefix + "parametrizations.weight.original1")
    state["predictor.weight"] = torch.zeros(527, 32)
    upstream_cfg = {
        **cfg,
        "dropout": 0.1,
        "encoder_layerdrop": 0.05,
        "layer_wise_gradient_decay_ratio": 0.6,
        "relative_position_embedding": True,
        "gru_rel_pos": True,
        "deep_norm": True,
        "finetuned_model": True,
    }
    path = tmp_path / "BEATs_tiny.pt"
    torch.save({"cfg": upstream_cfg, "model": state}, path)
    torch.manual_seed(2)  # a different random init, fully overwritten by the file
    loaded = AudioAdapter(tiny_audio_adapter_config(encoder_config=None, checkpoint=str(path)), 64).encoder
    fbank = torch.randn(2, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded(fbank), source(fbank), atol=1e-5, rtol=0)
    tables = {id(layer.self_attn.relative_attention_bias) for layer in loaded.encoder.layers}
    assert len(tables) == 1  # one shared table
    with pytest.raises(ValueError, match="encoder_layers=3 but the checkpoint cfg has 2"):
        AudioAdapter(tiny_audio_adapter_config(encoder_config={"encoder_layers": 3}, checkpoint=str(path)), 64)


def test_shared_bias_table_is_listed_per_layer_and_saves(adapter, tmp_path):
    state = adapter.encoder.state_dict()
    names = [f"encoder.layers.{i}.self_attn.relative_attention_bias.weight" for i in range(2)]
    assert all(n in state for n in names) and torch.equal(state[names[0]], state[names[1]])
    save_tensors(state, tmp_path / "beats.safetensors")  # no aliased storage left in the state dict


# --- Q-Former ---------------------------------------------------------------------------------
def test_projector_type_parsing_and_non_qformer_projector():
    assert parse_qformer_type("qformer_32N_2L") == (32, 2)
    assert parse_qformer_type("qformer_4N_1L") == (4, 1)
    assert parse_qformer_type("mlp2x_gelu") is None
    with pytest.raises(ValueError, match="at least one query"):
        AudioAdapterConfig(projector_type="qformer_0N_2L")
    torch.manual_seed(0)
    mlp = AudioAdapter(tiny_audio_adapter_config(projector_type="mlp2x_gelu"), 64)
    assert mlp.num_tokens == 64 and isinstance(mlp.projector, torch.nn.Sequential)
    assert mlp(torch.zeros(1, 128, 128)).shape == (1, 64, 64)
    with pytest.raises(ValueError, match="gives 64 tokens per input but qformer_max_positions is 32"):
        AudioAdapter(tiny_audio_adapter_config(qformer_max_positions=32), 64)


def test_qformer_layers_match_transformers_bert_layers():
    """Independent check: transformers' BertLayer with cross-attention, fed our weights."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    torch.manual_seed(0)
    cfg = QFormerConfig(
        num_queries=8,
        num_layers=2,
        hidden_size=32,
        num_heads=4,
        intermediate_size=64,
        encoder_width=32,
        max_positions=64,
        dropout=0.0,
    )
    qformer = QFormerProjector(cfg, 16).eval()
    bert_cfg = BertConfig(
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        is_decoder=True,
        add_cross_attention=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-12,
    )
    bert_cfg._attn_implementation = "eager"
    layers = []
    for ours in qformer.audio_Qformer.bert.encoder.layer:
        ref = BertLayer(bert_cfg).eval()
        ref.load_state_dict({k.replace("_query", ""): v for k, v in ours.state_dict().items()}, strict=True)
        layers.append(ref)
    feats = torch.randn(3, 40, 32)
    with torch.no_grad():
        got = qformer(feats)
        context = feats + qformer.audio_position_embedding.weight[:40]
        ln = qformer.audio_Qformer.bert.embeddings.LayerNorm
        x = torch.nn.functional.layer_norm(
            qformer.audio_query_tokens.expand(3, -1, -1), (32,), ln.weight, ln.bias, 1e-12
        )
        for ref in layers:
            out = ref(x, attention_mask=None, encoder_hidden_states=context)
            x = out[0] if isinstance(out, tuple) else out
        expected = qformer.audio_llama_proj(x)
    assert got.shape == (3, 8, 16)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --- published size ---------------------------------------------------------------------------
@pytest.mark.slow
def test_published_size_shapes_keys_and_counts(media):
    torch.manual_seed(0)
    adapter = AudioAdapter(AudioAdapterConfig(), llm_hidden_size=4096).eval()
    enc = adapter.encoder.state_dict()
    expected = {
        "patch_embedding.weight": (512, 1, 16, 16),
        "layer_norm.weight": (512,),
        "post_extract_proj.weight": (768, 512),
        "post_extract_proj.bias": (768,),
        "encoder.pos_conv.0.parametrizations.weight.original0": (1, 1, 128),
        "encoder.pos_conv.0.parametrizations.weight.original1": (768, 48, 128),
        "encoder.pos_conv.0.bias": (768,),
        "encoder.layer_norm.bias": (768,),
    }
    for i in (0, 11):
        p = f"encoder.layers.{i}."
        expected.update(
            {
                p + "self_attn.q_proj.weight": (768, 768),
                p + "self_attn.out_proj.bias": (768,),
                p + "self_attn.grep_linear.weight": (8, 64),
                p + "self_attn.grep_linear.bias": (8,),
                p + "self_attn.grep_a": (1, 12, 1, 1),
                p + "self_attn.relative_attention_bias.weight": (320, 12),
                p + "self_attn_layer_norm.weight": (768,),
                p + "fc1.weight": (3072, 768),
                p + "fc2.weight": (768, 3072),
                p + "final_layer_norm.bias": (768,),
            }
        )
    assert {k: tuple(enc[k].shape) for k in expected} == expected
    assert "encoder.layers.12.fc1.weight" not in enc and not any(k.startswith("predictor") for k in enc)
    assert round(sum(p.numel() for p in adapter.encoder.parameters()) / 1e5) == 903  # 90.3 M

    proj = adapter.projector.state_dict()
    assert len(proj) == 58 and sum(v.numel() for v in proj.values()) == 22_865_920
    assert tuple(proj["audio_query_tokens"].shape) == (1, 32, 768)
    assert tuple(proj["audio_position_embedding.weight"].shape) == (1024, 768)
    assert tuple(proj["audio_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"].shape) == (768, 768)
    assert tuple(proj["audio_Qformer.bert.encoder.layer.1.output_query.dense.weight"].shape) == (768, 3072)
    assert tuple(proj["audio_llama_proj.weight"].shape) == (4096, 768)

    batch = adapter.prepare([media["flac"]])
    assert batch.shape == (1, 1024, 128)
    with torch.no_grad():
        features = adapter.encode(batch)
        assert features.shape == (1, 512, 768) and torch.isfinite(features).all()
        assert adapter.project(features).shape == (1, 32, 4096)
    assert adapter.num_tokens == 32


# --- composed model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def audio_model():
    from mcomp.tiny import build_tiny_mllm, tiny_image_adapter_config

    # eval(): a freshly built module is in training mode, where the Q-Former's (bert-base) dropout is active.
    return build_tiny_mllm([tiny_image_adapter_config(), tiny_audio_adapter_config()], seed=0).eval()


PROMPT = "USER: <audio>\nWhat is the sound? ASSISTANT:"


def test_composed_model_forward_on_audio_files(audio_model, media):
    inputs = audio_model.prepare_inputs([PROMPT, PROMPT], [{"audio": media["wav"]}, {"audio": media["mp4"]}])
    audio_index = audio_model.modalities.index("audio")
    assert ((inputs.modality_ids == audio_index).sum(-1) == 8).all()  # qformer_8N_2L: 8 tokens each
    out = audio_model.generate([PROMPT], [{"audio": str(media["flac"])}], max_new_tokens=4)
    assert len(out) == 1 and isinstance(out[0], str)
    a = audio_model.loglikelihood(PROMPT, ["a dog", "music"], {"audio": str(media["wav"])})
    b = audio_model.loglikelihood(PROMPT, ["a dog", "music"], {"audio": str(media["flac"])})
    assert all(math.isfinite(r.logprob) and r.logprob < 0 for r in a)
    assert abs(a[0].logprob - b[0].logprob) > 1e-6  # the audio reaches the LLM


def test_composed_model_image_and_audio_and_bad_audio(audio_model, media, image_files):
    prompt = "USER: <image>\n<audio>\nDescribe both. ASSISTANT:"
    out = audio_model.generate([prompt], [{"image": image_files["png"], "audio": media["ogg"]}], max_new_tokens=3)
    assert len(out) == 1
    with pytest.raises(MediaBatchError) as err:
        audio_model.prepare_inputs([PROMPT, PROMPT], [{"audio": media["wav"]}, {"audio": media["video_only"]}])
    assert list(err.value.failures) == [1] and "video_only.mp4" in str(err.value)


def test_composed_model_save_load_round_trip(audio_model, media, tmp_path):
    from mcomp.model import MultimodalLM

    audio_model.save_pretrained(tmp_path / "mllm")
    loaded = MultimodalLM.from_pretrained(tmp_path / "mllm")
    before = audio_model.loglikelihood(PROMPT, ["music"], {"audio": str(media["wav"])})[0].logprob
    after = loaded.loglikelihood(PROMPT, ["music"], {"audio": str(media["wav"])})[0].logprob
    assert after == pytest.approx(before, abs=1e-4)


# --- Whisper alternative ----------------------------------------------------------------------
def _tiny_whisper_config(**overrides) -> WhisperAudioAdapterConfig:
    fields = dict(
        encoder_config=load_config("encoders", "tiny-whisper.json"),
        projector_type="qformer_4N_1L",
        qformer_hidden_size=32,
        qformer_num_heads=4,
        qformer_intermediate_size=64,
        qformer_max_positions=50,
    )
    fields.update(overrides)
    return WhisperAudioAdapterConfig(**fields)


def test_whisper_adapter_features_and_shapes(media):
    from transformers import WhisperFeatureExtractor

    torch.manual_seed(0)
    adapter = WhisperAudioAdapter(_tiny_whisper_config(), 64).eval()
    got = adapter.input_tensor(str(media["flac"]))
    mono = AF.resample(torch.from_numpy(media["stereo_samples"]).mean(dim=1), SR44, 16000)
    reference = WhisperFeatureExtractor(feature_size=80, chunk_length=1)(
        mono.numpy(), sampling_rate=16000, return_tensors="pt"
    )
    assert got.shape == (80, 100)
    torch.testing.assert_close(got, reference["input_features"][0], atol=1e-5, rtol=0)
    batch = adapter.prepare([media["flac"], media["mp3"]])
    with torch.no_grad():
        assert adapter.encode(batch).shape == (2, 50, 32)
        assert adapter(batch).shape == (2, 4, 64) and adapter.num_tokens == 4
    with pytest.raises(MediaBatchError) as err:
        adapter.prepare([media["wav"], media["corrupt"]])
    assert list(err.value.failures) == [1]


def test_whisper_adapter_loads_a_local_directory_and_composes(media, tmp_path):
    from transformers import WhisperConfig, WhisperModel

    from mcomp.tiny import build_tiny_mllm

    torch.manual_seed(3)
    source = WhisperModel(WhisperConfig(**load_config("encoders", "tiny-whisper.json"))).eval()
    source.save_pretrained(tmp_path / "whisper")
    cfg = _tiny_whisper_config(encoder_config=None, checkpoint=str(tmp_path / "whisper"), projector_type="mlp2x_gelu")
    model = build_tiny_mllm([cfg], seed=0).eval()
    adapter = model.adapters["audio"]
    assert isinstance(adapter, WhisperAudioAdapter) and adapter.num_tokens == 50
    own = adapter.encoder.state_dict()
    for name, value in source.encoder.state_dict().items():
        assert torch.equal(own[name], value), name
    inputs = model.prepare_inputs([PROMPT], [{"audio": media["wav"]}])
    assert (inputs.modality_ids == 0).sum() == 50
    assert len(model.generate([PROMPT], [{"audio": media["wav"]}], max_new_tokens=2)) == 1
