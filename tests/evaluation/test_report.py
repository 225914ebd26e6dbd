"""The verdict's reading of the positive control: significant, significant only for the fold ensembles, or no power."""

import pytest

from medgen.evaluation.report import verdict


def _results(p_holm: float, ensemble_p_holm: float | None) -> dict:
    ensemble = None if ensemble_p_holm is None else {"gain": 0.06, "ci_low": 0.01, "ci_high": 0.11, "p": ensemble_p_holm,
                                                      "p_holm": ensemble_p_holm}
    oracle = {"arm": "oracle_f50", "label": "oracle 50%", "gain": 0.06, "ci_low": -0.01, "ci_high": 0.13, "p": p_holm,
              "p_holm": p_holm, "ensemble": ensemble, "generators": []}
    real = {"arm": "real", "test_balanced_accuracy": {"mean": 0.52, "sd": 0.02},
            "test_ensemble": {"balanced_accuracy": 0.56}}
    return {"arms": [real], "folds": 6, "class_names": ["CN", "MCI", "AD"], "generators": {},
            "controls": {"oracle": [oracle], "permuted": None, "augmentation": None, "linear": None}}


@pytest.mark.parametrize(("p_holm", "ensemble_p", "says"), [
    (0.01, 0.2, None),
    (0.2, 0.01, "significant for the fold ensembles"),
    (0.2, 0.3, "no power"),
    (0.2, None, "no power"),
])
def test_positive_control_sentence(p_holm, ensemble_p, says):
    line = next(v for v in verdict(_results(p_holm, ensemble_p)) if v.startswith("Positive control"))
    if ensemble_p is not None:
        assert "test-subject bootstrap 95% CI +1.0 to +11.0" in line
    if says is None:
        assert line.endswith(".") and "not significant" not in line
    else:
        assert says in line
