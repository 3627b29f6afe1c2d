"""time (TICL): hour bin (and month where trained) from the image features, with top-k."""
from __future__ import annotations

from serving.model import top_k
from serving.predictors.base import Predictor, register_predictor


@register_predictor("time")
class TimePredictor(Predictor):
    def predict(self, batch):
        features = batch.features  # the shared tower first: its session opens (and fails) first
        out = self.model.session("time_head").run(image_features=features)
        centres = self.meta["hour_bin_centre_minutes"]
        k = self.settings.top_k
        records = []
        for i, hour_row in enumerate(top_k(out["hour_logits"], k)):
            minutes = centres[hour_row[0]]
            record = {"hour_bin": int(hour_row[0]), "time": f"{int(minutes // 60):02d}:{int(minutes % 60):02d}",
                      "hour_top_k": hour_row.tolist()}
            if "month_logits" in out:
                month_row = top_k(out["month_logits"][i:i + 1], min(k, 12))[0]
                record.update(month=int(month_row[0]) + 1, month_top_k=(month_row + 1).tolist())
            records.append(record)
        return records
