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
