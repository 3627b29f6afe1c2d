"""contextual (ImageCoDe): which of a set of near-identical frames a description picks."""
from __future__ import annotations

import numpy as np

from serving.items import Item, load_pixels
from serving.model import normalize
from serving.predictors.base import Predictor, register_predictor


@register_predictor("contextual")
class ContextualPredictor(Predictor):
    item = "a set of frames (0.jpg ... 9.jpg) with a description in its json"
    shards_only = True

    def load(self, item: Item):
        """(pixels [C, 3, S, S], description, static) of a multi-image sample, or why it cannot be used."""
        size = self.meta["num_candidates"]
        if item.error:
            return item.error
        if not item.frames or len(item.frames) != size:
            return f"missing_image: {len(item.frames or [])} frames, {size} expected"
        meta = {} if item.meta is None else item.meta
        if not isinstance(meta, dict):
            return f"bad_json: json must be an object, not a {type(meta).__name__}"
        description = meta.get("description") or meta.get("caption")
        if not isinstance(description, str) or not description.strip():
            return "bad_json: json.description must be a non-empty string"
        pixels = [load_pixels(Item(item.key, item.source, data), self.model.preprocess) for data in item.frames]
        bad = next((p for p in pixels if isinstance(p, str)), None)
        return bad or (np.stack(pixels), description, bool(meta.get("static", False)))

    def predict(self, batch):
        size = self.meta["num_candidates"]
        pixels = np.concatenate([x[0] for x in batch.loaded])
        frames = normalize(self.model.image_features(pixels)).reshape(len(batch.loaded), size, -1)
        text = self.model.text_embeddings([x[1] for x in batch.loaded])
        static = np.array([x[2] for x in batch.loaded])
        scores = self.model.session("contextual_scorer").run(frames=frames, text=text, static=static)["scores"]
        return [{"index": int(row.argmax()), "scores": [float(v) for v in row]} for row in scores]

