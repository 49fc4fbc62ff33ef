"""The label file writers (``localize --format json|csv|jsonl``): every column holds the field its header names."""

from __future__ import annotations

import csv
import io
import json

import pytest

from avepipe.localization import SecondLabel, VideoLabels
from avepipe.outputs import CSV_FIELDS, format_probability, get_writer


def _record() -> VideoLabels:
    seconds = [
        SecondLabel(0, 1, "Dog", event_probability=0.91, probability=0.62,
                    top3=[{"label": "Dog", "probability": 0.62}, {"label": "Cat", "probability": 0.21},
                          {"label": "background", "probability": 0.09}]),
        SecondLabel(1, 2, "background", event_probability=0.33, probability=0.67,
                    top3=[{"label": "background", "probability": 0.67}, {"label": "Dog", "probability": 0.18}]),
    ]
    return VideoLabels("clips/a.mp4", "a", 2.0, seconds, [{"label": "Dog", "start": 0, "end": 1},
                                                          {"label": "background", "start": 1, "end": 2}])


def _expected_rows() -> list[dict]:
    return [
        {"video": "clips/a.mp4", "start": 0, "end": 1, "label": "Dog", "probability": 0.62, "event_probability": 0.91,
         "top1": "Dog", "top1_probability": 0.62, "top2": "Cat", "top2_probability": 0.21,
         "top3": "background", "top3_probability": 0.09},
        {"video": "clips/a.mp4", "start": 1, "end": 2, "label": "background", "probability": 0.67,
         "event_probability": 0.33, "top1": "background", "top1_probability": 0.67, "top2": "Dog",
         "top2_probability": 0.18, "top3": "", "top3_probability": ""},
    ]


def test_csv_columns_hold_their_fields():
    text = get_writer("csv")([_record()])
    reader = csv.DictReader(io.StringIO(text))
    assert tuple(reader.fieldnames) == CSV_FIELDS
    assert list(reader) == [{k: str(v) for k, v in row.items()} for row in _expected_rows()]


def test_jsonl_is_one_object_per_second_and_one_per_failed_video():
    failed = VideoLabels("clips/b.mp4", "b", error="clips/b.mp4: no video stream")
    lines = get_writer("jsonl")([_record(), failed]).splitlines()
    assert [json.loads(line) for line in lines] == [*_expected_rows(),
                                                   {"video": "clips/b.mp4", "id": "b", "error": failed.error}]


def test_json_is_the_whole_record():
    record = json.loads(get_writer("json")([_record()]))
    assert len(record) == 1 and record[0]["id"] == "a" and record[0]["error"] is None
    assert [(s["start"], s["label"], s["probability"], s["event_probability"]) for s in record[0]["seconds"]] == [
        (0, "Dog", 0.62, 0.91), (1, "background", 0.67, 0.33)]
    assert record[0]["spans"] == _record().spans


@pytest.mark.parametrize("value, shown", [(0.4999, "0.49"), (0.5, "0.50"), (0.996, "1.00"), (0.123, "0.12")])
def test_a_background_second_never_shows_an_event_probability(value, shown):
    assert format_probability(value) == shown
