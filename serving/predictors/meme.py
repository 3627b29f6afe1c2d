"""meme (CLIP4Meme): every meme's caption queries the gallery of all memes read, by fused QI/QC score."""
from __future__ import annotations

from typing import Any

import numpy as np

from serving.items import Item, load_pixels
from serving.model import ExportedModel, top_k
from serving.predictors.base import Predictor, register_predictor
from serving.tokenizer import WordPieceTokenizer

BRANCHES = ("fused", "qi", "qc")


def meme_tokenizer(model: ExportedModel) -> WordPieceTokenizer:
    """The frozen BERT's tokenizer the export carries (torch-free twin of transformers')."""
    meta = model.manifest["tasks"]["meme"]
    return WordPieceTokenizer(model.file(meta["emotion_tokenizer"]), meta["emotion_max_length"],
                              meta["pad_token_id"], meta["pad_token"])


def meme_fields(meta: dict[str, Any]) -> tuple[str, str, list[str]]:
    """(query, context, emotions) of a meme's json; ValueError naming the bad field. Training uses it too.

    The caption (the query) must be a non-empty string; the context may be empty (a meme whose title is
    empty gets an empty context, as in the original's loader). Strings are returned exactly as stored.
    """
    if not isinstance(meta, dict):
        raise ValueError(f"json must be an object, not a {type(meta).__name__}")
    query, context, emotions = meta.get("caption"), meta.get("context"), meta.get("emotions", [])
    if not isinstance(query, str) or not query.strip():
        raise ValueError("json.caption must be a non-empty string")
    if not isinstance(context, str):
        raise ValueError("json.context must be a string (empty is allowed)")
    if not isinstance(emotions, list) or not all(isinstance(e, str) for e in emotions):
        raise ValueError("json.emotions must be a list of strings")
    return query, context, emotions


def meme_scores(query: np.ndarray, qi: np.ndarray, context: np.ndarray, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """[Q, G] QI, QC and fused scores of normalised embeddings; NumPy arrays or torch tensors (training's
    evaluation scores with this function too).

    ``meta["fusion"]`` ``shared_scale`` (the default, the original's): one ``logit_scale`` (= 1/T) for
    both, QI = cos_QI / T, QC = cos_QC / T, fused = (alpha cos_QI + (1 - alpha) cos_QC) / T.
    ``separate_scales``: QI = ``qi_logit_scale`` cos_QI, QC = ``qc_logit_scale`` cos_QC, fused =
    alpha QI + (1 - alpha) QC.
    """
    alpha = meta["alpha"]
    cos_qi, cos_qc = query @ qi.T, query @ context.T
    fusion = meta.get("fusion", "shared_scale")
    if fusion == "shared_scale":
        scale = meta["logit_scale"]
        return {"qi": scale * cos_qi, "qc": scale * cos_qc, "fused": scale * (alpha * cos_qi + (1 - alpha) * cos_qc)}
    if fusion == "separate_scales":
        s_qi, s_qc = meta["qi_logit_scale"] * cos_qi, meta["qc_logit_scale"] * cos_qc
        return {"qi": s_qi, "qc": s_qc, "fused": alpha * s_qi + (1 - alpha) * s_qc}
    raise ValueError(f"meme: unknown fusion {fusion!r} (shared_scale or separate_scales)")


@register_predictor("meme")
class MemePredictor(Predictor):
    """Embeds the memes batch by batch (image, frozen-BERT emotions, context); scores at the end.

    Each query is scored against the whole gallery, as the task's evaluation does, so the records
    come from :meth:`finish`.
    """

    item = "a meme image with caption, context and emotions in its json"
    shards_only = True

    def __init__(self, model, settings):
        super().__init__(model, settings)
        self.emotion_tokenizer = meme_tokenizer(model)
        self.parts: dict[str, list[np.ndarray]] = {"query": [], "qi": [], "context": []}
        self.keys: list[dict] = []
        self.queries: list[str] = []

    def load(self, item: Item):
        """(pixels, query, context, emotion text) of a meme sample, or why it cannot be used."""
        if item.error:
            return item.error
        try:
            query, context, emotions = meme_fields({} if item.meta is None else item.meta)
        except ValueError as err:
            return f"bad_json: {err}"
        pixels = load_pixels(item, self.model.preprocess)
        return pixels if isinstance(pixels, str) else (pixels, query, context, " ".join(emotions))

    def predict(self, batch):
        pixels, query, context, emotion = (list(column) for column in zip(*batch.loaded))
        model = self.model
        emotion_features = model.session("meme_emotion_encoder").run(**self.emotion_tokenizer(emotion))["emotion_features"]
        self.parts["qi"].append(model.session("meme_qi").run(
            image_features=model.image_features(np.stack(pixels)), emotion_features=emotion_features,
            context_ids=model.tokenizer(context))["qi_embedding"])
        self.parts["query"].append(model.text_embeddings(query))
        self.parts["context"].append(model.text_embeddings(context))
        self.keys += batch.ids
        self.queries += query
        return None

    def finish(self, out_dir):
        if not self.keys:
            return
        emb = {k: np.concatenate(v) for k, v in self.parts.items()}
        scores = meme_scores(emb["query"], emb["qi"], emb["context"], self.meta)
        for i, row in enumerate(top_k(scores["fused"], self.settings.top_k)):
            results = [{**self.keys[j], **{b: float(scores[b][i, j]) for b in BRANCHES}} for j in row]
            yield self.keys[i], {"query": self.queries[i], "results": results}
