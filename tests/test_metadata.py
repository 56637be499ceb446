"""The header's facts as a model's side input: encoding of each field and of unknowns."""
import numpy as np
import pytest
import tensorflow as tf

from pneumo_tf.data import metadata
from pneumo_tf.errors import UserError

VIEWS = ["AP", "PA", "", "LL", " ap "]
SEXES = ["M", "F", "", "O", "f"]
AGES = [51, 7, -1, 148, 0]
EXPECTED = np.array([
    # view AP PA ?   sex M F ?   age/100 unknown
    [1, 0, 0, 1, 0, 0, 0.51, 0],
    [0, 1, 0, 0, 1, 0, 0.07, 0],
    [0, 0, 1, 0, 0, 1, 0.00, 1],
    [0, 0, 1, 0, 0, 1, 1.20, 0],  # LL and O are "unknown"; 148 years is clipped to 120
    [1, 0, 0, 0, 1, 0, 0.00, 0],  # case and spaces do not matter; age 0 is known
], np.float32)


def test_every_field_and_its_unknown_eagerly_and_inside_tf_data():
    eager = metadata.encode(("view", "sex", "age"), VIEWS, SEXES, AGES).numpy()
    np.testing.assert_allclose(eager, EXPECTED, atol=1e-6)
    dataset = tf.data.Dataset.from_tensor_slices({"view": VIEWS, "sex": SEXES, "age": AGES}).batch(5)
    mapped = next(iter(dataset.map(lambda batch: metadata.encode_batch(("view", "sex", "age"), batch)))).numpy()
    np.testing.assert_array_equal(mapped, eager)


@pytest.mark.parametrize("fields,columns", [("view", [0, 1, 2]), ("sex", [3, 4, 5]), ("age", [6, 7]),
                                            ("age,view", [0, 1, 2, 6, 7]), ("", [])])
def test_a_subset_of_fields_keeps_their_columns_in_the_canonical_order(fields, columns):
    parsed = metadata.parse_fields(fields)
    assert metadata.width(parsed) == len(columns)
    encoded = metadata.encode(parsed, VIEWS, SEXES, AGES).numpy()
    assert encoded.shape == (5, len(columns))
    np.testing.assert_allclose(encoded, EXPECTED[:, columns], atol=1e-6)


def test_unknown_field_names_are_refused():
    with pytest.raises(UserError, match="unknown metadata field.*height.*known: view, sex, age"):
        metadata.parse_fields("view,height")


def test_synthetic_views_can_carry_the_label():
    from pneumo_tf.records import synthetic

    with_opacity, without = synthetic.ap_probabilities(4.0)
    share = synthetic.CLASS_SHARES[2]
    assert with_opacity * share + without * (1 - share) == pytest.approx(synthetic.AP_SHARE)
    ratio = (with_opacity * share / synthetic.AP_SHARE) / ((1 - with_opacity) * share / (1 - synthetic.AP_SHARE))
    assert ratio == pytest.approx(4.0)
    assert synthetic.ap_probabilities(1.0) == pytest.approx((synthetic.AP_SHARE, synthetic.AP_SHARE))


@pytest.mark.slow
def test_a_synthetic_set_with_an_opacity_view_ratio_has_it(tmp_path):
    import pandas as pd

    from pneumo_tf.records import dicom, synthetic

    paths = synthetic.write_dataset(str(tmp_path), synthetic.SyntheticConfig(
        600, image_size=32, seed=1, opacity_view_ratio=4.0), workers=1)
    labels = pd.read_csv(paths["train_labels"]).groupby("patientId").Target.max()
    views = pd.Series({image_id: dicom.read(f"{paths['train_dir']}/{image_id}.dcm").ViewPosition
                       for image_id in labels.index})
    rate = labels.groupby(views).mean()
    assert 0.40 < (views == "AP").mean() < 0.54
    assert 2.5 < rate["AP"] / rate["PA"] < 6.5


@pytest.fixture(scope="module")
def metadata_model(tiny_records, tmp_path_factory) -> str:
    """A tiny mask_resnet with a three-class image head and every metadata field, trained for two steps."""
    from pneumo_tf.training import loop

    model_dir = str(tmp_path_factory.mktemp("metadata_model") / "model")
    loop.train_and_evaluate(loop.TrainConfig(
        records_dir=tiny_records, model_dir=model_dir, model="mask_resnet",
        model_options={"channels": 4, "n_blocks": 1, "depth": 2, "image_head": "three_class",
                       "metadata": "view,sex,age"},
        image_size=64, batch_size=4, epochs=1, steps_per_epoch=2, profile_steps=None))
    return model_dir


def _jpeg(seed: int) -> bytes:
    import io

    from PIL import Image

    from pneumo_tf.records import synthetic

    buffer = io.BytesIO()
    Image.fromarray(synthetic.make_radiograph(np.random.default_rng(seed), [], 256)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.slow
def test_a_model_with_side_inputs_round_trips_through_evaluate_predict_and_serve(metadata_model, tiny_records,
                                                                                tmp_path):
    import io

    import pandas as pd

    from pneumo_tf.evaluation import report
    from pneumo_tf.inference import offline, web
    from pneumo_tf.models import exported

    assert exported.load(metadata_model).metadata == ("view", "sex", "age")
    evaluated = report.evaluate(report.EvaluateConfig(model_dir=metadata_model, records_dir=tiny_records))
    assert evaluated.summary["images"] > 0 and 0.0 <= evaluated.summary["auc"] <= 1.0
    # Two copies of one JPEG, told apart only by the facts the metadata CSV gives them.
    folder = tmp_path / "jpg"
    folder.mkdir()
    for name in ("ap", "pa"):
        (folder / f"{name}.jpg").write_bytes(_jpeg(3))
    facts = tmp_path / "facts.csv"
    facts.write_text("patientId,PatientAge,PatientSex,ViewPosition\nap,80,M,AP\npa,25,F,PA\n")
    app = web.create_app(metadata_model).test_client()
    probabilities = {}
    for name, fields in (("ap", {"view": "AP", "sex": "M", "age": "80"}), ("pa", {"view": "PA", "sex": "F",
                                                                                 "age": "25"})):
        response = app.post("/api/predict", data={"file": (io.BytesIO(_jpeg(3)), f"{name}.jpg"), **fields},
                            content_type="multipart/form-data")
        assert response.status_code == 200, response.json
        result = response.json
        assert (result["image"]["view"], result["image"]["sex"], result["image"]["age"]) == (
            fields["view"], fields["sex"], int(fields["age"]))
        probabilities[name] = result["probability"]
    assert probabilities["ap"] != pytest.approx(probabilities["pa"], abs=1e-7)  # the facts reach the network
    # Prediction with the same facts from the CSV writes what the page shows, box for box.
    output = tmp_path / "submission.csv"
    summary = offline.predict(offline.PredictConfig(model_dir=metadata_model, output=str(output),
                                                    dicom_dir=str(folder), metadata_csv=str(facts), workers=1),
                              progress_stream=io.StringIO())
    assert summary["images"] == 2
    written = pd.read_csv(output, keep_default_na=False).set_index("patientId").PredictionString
    for name, fields in (("ap", {"view": "AP", "sex": "M", "age": "80"}), ("pa", {"view": "PA", "sex": "F",
                                                                                 "age": "25"})):
        response = app.post("/api/predict", data={"file": (io.BytesIO(_jpeg(3)), f"{name}.jpg"), **fields},
                            content_type="multipart/form-data")
        assert response.json["prediction_string"] == written[name]


def test_bad_form_facts_are_a_400(metadata_model):
    import io

    from pneumo_tf.inference import web

    app = web.create_app(metadata_model).test_client()
    response = app.post("/api/predict", data={"file": (io.BytesIO(_jpeg(1)), "x.jpg"), "sex": "X", "age": "12"},
                        content_type="multipart/form-data")
    assert response.status_code == 400
    assert response.json["error"] == (
        "sex must be M, F, O or empty and age whole years (0-150) or empty, not 'X' and '12'")
