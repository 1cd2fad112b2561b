"""The data vocabulary of the from-scratch text encoder (ldm/models/vocabulary.py): built from the captions, the
same encoder as the full vocabulary on known tokens, unknown tokens mapped to OOV with a warning, and kept in the
checkpoint by train.py's `vocabulary=data`."""
import copy
import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from ldm.loading import load_latent_diffusion
from ldm.models.conditioners import TextTransformer
from ldm.models.vocabulary import OOV_ROW, vocabulary_of_captions
from ldm.nets.vae import AutoencoderNet
from ldm.training.pipeline import train
from ldm.training.text_vocabulary import train_captions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a red circle at the top left", "a blue square at the center", "a green triangle at the right"]


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return vocabulary_of_captions("ViT-L-14", iter(CAPTIONS))


@pytest.fixture(scope="module")
def pair(ids):
    """A data-vocabulary encoder and the full-vocabulary encoder with the same weights on the known tokens."""
    torch.manual_seed(0)
    small = TextTransformer(width=32, layers=1, heads=2, vocabulary=ids).eval()
    full = TextTransformer(width=32, layers=1, heads=2).eval()
    full.load_state_dict({k: v for k, v in small.state_dict().items() if k != "token_embedding.weight"}, strict=False)
    with torch.no_grad():
        full.token_embedding.weight[torch.tensor(ids)] = small.token_embedding.weight[1:]
    return small, full


def test_vocabulary_holds_exactly_the_caption_tokens_and_the_special_ones(ids, pair):
    tokenizer = pair[0].tokenizer
    expected = set(tokenizer(CAPTIONS).unique().tolist()) | {0, tokenizer.sot_token_id, tokenizer.eot_token_id}
    assert ids == sorted(expected)
    assert len(ids) == len({word for caption in CAPTIONS for word in caption.split()}) + 3  # one BPE token a word


def test_known_prompts_encode_as_with_the_full_vocabulary(ids, pair):
    small, full = pair
    assert small.token_embedding.num_embeddings == len(ids) + 1 and full.token_embedding.num_embeddings == 49408
    with torch.no_grad():
        torch.testing.assert_close(small(CAPTIONS + [""])["context"], full(CAPTIONS + [""])["context"])
    assert small.vocabulary.num_unknown == 0


def test_same_seed_same_model_and_same_random_stream_as_the_full_vocabulary(ids):
    """The data vocabulary starts from the full table's rows, so a seeded run builds the same encoder (and every net
    built after it gets the same initial weights): only the cost of a step differs."""
    outputs, after = [], []
    for vocabulary in (ids, None):
        torch.manual_seed(3)
        encoder = TextTransformer(width=32, layers=1, heads=2, vocabulary=vocabulary).eval()
        after.append(torch.rand(4))  # the next net's initial weights come from here
        with torch.no_grad():
            outputs.append(encoder(CAPTIONS + [""])["context"])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    torch.testing.assert_close(after[0], after[1], rtol=0, atol=0)


def test_unknown_tokens_are_mapped_to_oov_counted_and_named(pair):
    small, full = pair[0], copy.deepcopy(pair[1])
    prompt = ["a purple circle at the far left"]  # purple, far: not in the captions
    with pytest.warns(UserWarning, match=r"2 token\(s\) are not in .*\['(purple', 'far|far', 'purple)'\]"):
        out = small(prompt)["context"]
    assert small.vocabulary.num_unknown == 2
    tokens = small.tokenize(prompt)
    rows = small.vocabulary(tokens)
    unknown = torch.tensor([2, 6])  # after the start token: a purple circle at the far left
    assert (rows[0, unknown] == OOV_ROW).all() and (rows[0, :9] != OOV_ROW).sum() == 7
    with torch.no_grad():  # = the full encoder reading the OOV row's vector at those two positions
        full.token_embedding.weight[tokens[0, unknown]] = small.token_embedding.weight[OOV_ROW]
        torch.testing.assert_close(out, full(prompt)["context"])


def test_unresolved_data_vocabulary_and_bad_ids_are_explained():
    with pytest.raises(ValueError, match="filled in by train.py"):
        TextTransformer(width=32, layers=1, heads=2, vocabulary="data")
    with pytest.raises(ValueError, match=r"distinct ids in \[0, 49408\)"):
        TextTransformer(width=32, layers=1, heads=2, vocabulary=[3, 3])


def test_train_builds_the_vocabulary_from_the_captions_and_the_checkpoint_keeps_it(tmp_path):
    ae = str(tmp_path / "ae.ckpt")
    vae = dict(embed_dim=3, z_channels=3, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[],
               norm_groups=4)
    torch.save({"state_dict": {f"vae.{k}": v for k, v in AutoencoderNet(**vae).state_dict().items()},
                "hyper_parameters": {"vae": vae}}, ae)
    overrides = ["experiment=ldm_f4_text", "size=tiny", "model.conditioner.vocabulary=data",
                 f"paths.data_dir={tmp_path}/data", "data.resolution=32", "data.num_train=16", "data.num_val=8",
                 "data.samples_per_shard=8", "data.batch_size=4", "data.num_workers=0",
                 f"model.first_stage_ckpt={ae}",
                 "model.unet.channel_mult=[1,2]", "model.unet.attention_resolutions=[2]", "callbacks=default",
                 "logger=csv", "trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.limit_val_batches=1",
                 f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache", "cache_latents=false"]
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        result = train(compose("train", overrides=overrides))
    model = result.trainer.lightning_module
    ids = vocabulary_of_captions("ViT-L-14", train_captions(result.trainer.datamodule))
    assert model.conditioner.vocabulary.ids == ids and len(ids) < 40
    assert os.listdir(tmp_path / "cache" / "vocabulary")  # cached for the next run
    loaded = load_latent_diffusion(result.last_ckpt, use_ema=False)
    assert loaded.conditioner.vocabulary.ids == ids
    with torch.no_grad():
        torch.testing.assert_close(loaded.conditioner(CAPTIONS)["context"], model.cpu().conditioner(CAPTIONS)["context"])
