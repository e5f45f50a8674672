"""The ML backend over real HTTP (`annoloop serve`), with real tiny models and real image downloads."""

from __future__ import annotations

import concurrent.futures as cf
import io
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import ImageServer, Scene, publish, start_backend
from training.evaluate import box_iou

DETECT_CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image">
  <Label value="Circle"/><Label value="Square"/><Label value="Triangle"/>
</RectangleLabels></View>"""
POLYGON_CONFIG = """<View><Image name="img" value="$photo"/>
<PolygonLabels name="poly" toName="img"><Label value="Round" predicted_values="circle"/>
<Label value="square"/><Label value="triangle"/></PolygonLabels></View>"""
CHOICES_CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="kind" toName="image"><Choice value="Circle"/><Choice value="Square"/><Choice value="Triangle"/>
</Choices></View>"""
TOKEN = "test-legacy-token-0123456789"
LABELS = ("Circle", "Square", "Triangle")


def region_box(region: dict, scene: Scene) -> tuple[float, float, float, float]:
    v = region["value"]
    x0, y0 = v["x"] / 100 * scene.width, v["y"] / 100 * scene.height
    return x0, y0, x0 + v["width"] / 100 * scene.width, y0 + v["height"] / 100 * scene.height


@pytest.fixture(scope="module")
def backend(tmp_path_factory, starter_weights, redis_url, image_server: ImageServer):
    work = tmp_path_factory.mktemp("backend")
    model_dir = work / "models"
    publish(model_dir, starter_weights("detect"), "det-v1")
    publish(model_dir, starter_weights("segment"), "seg-v1", project="7")
    publish(model_dir, starter_weights("classify"), "cls-v1", project="8")
    override = work / "annoloop.yaml"
    # batch_size 4: the 8- and 10-task requests below span several chunks.
    override.write_text("images:\n  max_pixels: 4000000\n  timeout_s: 3\ninference:\n  batch_size: 4\n")
    b = start_backend(
        work,
        {
            "MODEL_DIR": str(model_dir),
            "REDIS_URL": redis_url,
            # The image server stands in for Label Studio's host: relative URLs resolve against it.
            "LABEL_STUDIO_URL": image_server.url,
            "LABEL_STUDIO_API_KEY": TOKEN,
            "ANNOLOOP_CONFIG": str(override),
        },
    )
    yield b
    b.stop()
    assert TOKEN not in b.log.read_text(), "the API token leaked into the logs"


def predict(backend, tasks, config=DETECT_CONFIG, project="1.1700000000", **kw) -> requests.Response:
    body = {"tasks": tasks, "project": project, "label_config": config, "params": {"context": None}}
    return requests.post(backend.url + "/predict", json=body, timeout=120, **kw)


def test_health_reports_models_and_redis(backend):
    r = requests.get(backend.url + "/health", timeout=5)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "UP"
    assert body["redis"] is True
    assert body["default_model_version"] == "det-v1"
    assert "warning" not in body


def test_setup_answers_the_served_version(backend):
    r = requests.post(backend.url + "/setup", json={"project": "1.170", "schema": DETECT_CONFIG}, timeout=5)
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == "det-v1"
    r = requests.post(backend.url + "/setup", json={"project": "7.170", "schema": POLYGON_CONFIG}, timeout=5)
    assert r.json()["model_version"] == "seg-v1"


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (
            '<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/></Choices></View>',
            "no supported control",
        ),
        (
            '<View><Image name="i" value="$image"/><TextArea name="x" toName="i"/></View>',
            "no supported control",
        ),
        ("<View><Image name=", "not valid XML"),
    ],
)
def test_setup_rejects_configs_it_cannot_serve(backend, schema, message):
    r = requests.post(backend.url + "/setup", json={"project": "1.170", "schema": schema}, timeout=5)
    assert r.status_code == 400
    assert message in r.json()["error"]


CATS = (
    '<View><Image name="i" value="$image"/><RectangleLabels name="l" toName="i"><Label value="Cat"/>'
    "</RectangleLabels></View>"
)
CAT_POLYGONS = CATS.replace("RectangleLabels", "PolygonLabels")


def test_labels_no_model_knows(backend, image_server):
    """The default model for a project of other classes counts as no model (connect now, pre-labels come with
    the project's first model); a project's own model that cannot fill its config is a 400 with the reason."""
    r = requests.post(backend.url + "/setup", json={"project": "3.170", "schema": CATS}, timeout=5)
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == "no-model"
    scene = image_server.write_scenes(1, seed=5)[0]
    r = predict(backend, [{"id": 1, "data": {"image": f"{image_server.url}/{scene.name}"}}], CATS, "3.170")
    assert r.status_code == 200
    assert r.json()["results"] == [] and r.json()["model_version"] is None
    assert "knows none of this project's labels" in r.json()["error"]
    # Project 7 is served its own segmentation model, whose classes are shapes.
    r = requests.post(backend.url + "/setup", json={"project": "7.170", "schema": CAT_POLYGONS}, timeout=5)
    assert r.status_code == 400 and "maps to a model class" in r.json()["error"]
    r = predict(
        backend, [{"id": 1, "data": {"image": f"{image_server.url}/{scene.name}"}}], CAT_POLYGONS, "7.1"
    )
    assert r.status_code == 400 and "maps to a model class" in r.json()["error"]


def test_predict_finds_the_shapes(backend, image_server):
    scenes = image_server.write_scenes(8, seed=101)
    tasks = [{"id": i + 1, "data": {"image": f"{image_server.url}/{s.name}"}} for i, s in enumerate(scenes)]
    r = predict(backend, tasks)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(tasks)
    matched = total = 0
    for scene, item in zip(scenes, results, strict=True):
        assert item["model_version"] == "det-v1"
        assert 0.0 <= item["score"] <= 1.0
        assert "error" not in item
        for region in item["result"]:
            assert region["type"] == "rectanglelabels"
            assert region["from_name"] == "label" and region["to_name"] == "image"
            assert region["value"]["rectanglelabels"][0] in LABELS
            assert 0.25 <= region["score"] <= 1.0  # pre-labels use the higher threshold
            v = region["value"]
            assert 0 <= v["x"] <= 100 and 0 <= v["y"] <= 100
            assert v["x"] + v["width"] <= 100.001 and v["y"] + v["height"] <= 100.001
            assert (region["original_width"], region["original_height"]) == (scene.width, scene.height)
        for shape in scene.shapes:
            total += 1
            want = LABELS[shape.cls]
            best = max(
                (
                    float(box_iou([region_box(reg, scene)], [shape.box])[0, 0])
                    for reg in item["result"]
                    if reg["value"]["rectanglelabels"] == [want]
                ),
                default=0.0,
            )
            matched += best >= 0.5
    assert total > 0
    assert matched / total >= 0.7, f"only {matched}/{total} shapes found with the right label at IoU >= 0.5"


def test_task_score_is_one_minus_uncertainty(backend, image_server):
    # A flat grey image: nothing to see, so the empty-image floor (0.5) applies and the score is 1 - 0.5.
    Image.new("RGB", (200, 150), (128, 128, 128)).save(image_server.root / "blank.png")
    scenes = image_server.write_scenes(1, seed=7)
    r = predict(backend, [{"data": {"image": "/blank.png"}}, {"data": {"image": "/" + scenes[0].name}}])
    blank, busy = r.json()["results"]
    assert blank["result"] == []
    assert blank["score"] == pytest.approx(0.5)
    assert busy["score"] != pytest.approx(0.5)


def test_token_goes_to_label_studio_only(backend, image_server):
    scenes = image_server.write_scenes(2, seed=5)
    foreign = image_server.url.replace("127.0.0.1", "localhost")  # same server, but not the configured host
    image_server.seen.clear()
    r = predict(
        backend,
        [{"data": {"image": "/" + scenes[0].name}}, {"data": {"image": f"{foreign}/{scenes[1].name}"}}],
    )
    assert r.status_code == 200
    assert all("error" not in x for x in r.json()["results"])
    by_path = {h["path"]: h for h in image_server.seen}
    assert by_path["/" + scenes[0].name].get("authorization") == f"Token {TOKEN}"
    assert "authorization" not in by_path["/" + scenes[1].name]


def test_one_bad_task_fails_alone(backend, image_server):
    root = image_server.root
    good = image_server.write_scenes(2, seed=9)
    (root / "corrupt.jpg").write_bytes(b"this is not an image at all")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(buf, "PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.new("RGB", (2500, 2000), (10, 20, 30)).save(root / "huge.png")  # 5 MP > max_pixels 4 MP
    tasks = [
        {"id": 1, "data": {"image": "/" + good[0].name}},
        {"id": 2, "data": {"other": "x"}},
        {"id": 3, "data": {"image": "/corrupt.jpg"}},
        {"id": 4, "data": {"image": "/truncated.png"}},
        {"id": 5, "data": {"image": "http://127.0.0.1:9/unreachable.png"}},
        {"id": 6, "data": {"image": "/huge.png"}},
        {"id": 7, "data": {"image": "s3://bucket/key.png"}},
        {"id": 8, "data": {"image": "/missing.png"}},
        "not a task",
        {"id": 10, "data": {"image": "/" + good[1].name}},
    ]
    r = predict(backend, tasks)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == len(tasks)
    expected_errors = {
        1: "no image field 'image'",
        2: "not a readable image",
        3: "corrupt or truncated",
        4: "cannot download",
        5: "above images.max_pixels",
        6: "unsupported image URL scheme 's3'",
        7: "HTTP 404",
        8: "not an object",
    }
    for i, fragment in expected_errors.items():
        assert res[i]["result"] == [] and res[i]["score"] is None
        assert fragment in res[i]["error"], (i, res[i]["error"])
    for i in (0, 9):
        assert "error" not in res[i]
        assert res[i]["result"], "a good image next to bad ones still gets its pre-labels"
        assert res[i]["model_version"] == "det-v1"


@pytest.mark.parametrize(
    ("data", "content_type", "message"),
    [
        ("{not json", "application/json", "must be JSON"),
        ("[1, 2]", "application/json", "JSON object"),
        ('{"label_config": "<View/>"}', "application/json", "tasks"),
        ('{"tasks": "abc", "label_config": "<View/>"}', "application/json", "tasks"),
        ('{"tasks": []}', "application/json", "label_config"),
        ("tasks=1", "application/x-www-form-urlencoded", "must be JSON"),
    ],
)
def test_malformed_predict_requests_get_400(backend, data, content_type, message):
    r = requests.post(backend.url + "/predict", data=data, headers={"Content-Type": content_type}, timeout=5)
    assert r.status_code == 400
    assert message in r.json()["error"]


def test_unknown_routes_and_methods_answer_json(backend):
    r = requests.get(backend.url + "/predict", timeout=5)
    assert r.status_code == 405 and "error" in r.json()
    r = requests.get(backend.url + "/nope", timeout=5)
    assert r.status_code == 404 and "error" in r.json()
    r = requests.post(
        backend.url + "/webhook", data="{", headers={"Content-Type": "application/json"}, timeout=5
    )
    assert r.status_code == 400


def test_polygons_from_a_segmentation_model(backend, image_server):
    scenes = image_server.write_scenes(3, seed=33)
    tasks = [{"id": i, "data": {"photo": "/" + s.name}} for i, s in enumerate(scenes)]
    r = predict(backend, tasks, config=POLYGON_CONFIG, project="7.1700000000")
    assert r.status_code == 200, r.text
    items = r.json()["results"]
    assert all(x["model_version"] == "seg-v1" for x in items)
    regions = [reg for x in items for reg in x["result"]]
    assert regions, "the segmentation model found nothing on three scenes"
    for reg in regions:
        assert reg["type"] == "polygonlabels" and reg["from_name"] == "poly" and reg["to_name"] == "img"
        assert reg["value"]["polygonlabels"][0] in ("Round", "square", "triangle")
        pts = reg["value"]["points"]
        assert len(pts) >= 3 and all(0 <= x <= 100 and 0 <= y <= 100 for x, y in pts)


def test_choices_from_a_classification_model(backend, image_server):
    scenes = image_server.write_scenes(3, seed=44)
    tasks = [{"id": i, "data": {"image": "/" + s.name}} for i, s in enumerate(scenes)]
    r = predict(backend, tasks, config=CHOICES_CONFIG, project="8.1700000000")
    assert r.status_code == 200, r.text
    for x in r.json()["results"]:
        assert x["model_version"] == "cls-v1"
        assert 0 <= x["score"] <= 1
        for reg in x["result"]:
            assert reg["type"] == "choices" and reg["value"]["choices"][0] in LABELS


def test_concurrent_requests_all_succeed(backend, image_server):
    scenes = image_server.write_scenes(4, seed=55)
    tasks = [{"data": {"image": "/" + s.name}} for s in scenes]

    def call(_):
        r = predict(backend, tasks)
        return r.status_code, [x["model_version"] for x in r.json()["results"]]

    with cf.ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(call, range(18)))
    assert all(code == 200 for code, _ in outcomes)
    assert all(versions == ["det-v1"] * 4 for _, versions in outcomes)


def test_no_model_answers_empty_then_picks_up_a_published_one(
    tmp_path, redis_url, starter_weights, image_server
):
    model_dir = tmp_path / "models"
    b = start_backend(
        tmp_path,
        {
            "MODEL_DIR": str(model_dir),
            "REDIS_URL": redis_url,
            "LABEL_STUDIO_URL": image_server.url,
            "LABEL_STUDIO_API_KEY": TOKEN,
        },
    )
    try:
        health = requests.get(b.url + "/health", timeout=5).json()
        assert health["default_model_version"] is None
        assert "no model weights" in health["warning"]
        scenes = image_server.write_scenes(1, seed=66)
        r = predict(b, [{"data": {"image": "/" + scenes[0].name}}])
        assert r.status_code == 200
        assert r.json()["results"] == []  # Label Studio stores nothing and asks again later
        assert "no model" in r.json()["error"]
        setup = requests.post(b.url + "/setup", json={"project": "1.170", "schema": DETECT_CONFIG}, timeout=5)
        assert setup.status_code == 200 and setup.json()["model_version"] == "no-model"
        publish(model_dir, starter_weights("detect"), "det-late")
        deadline = time.monotonic() + 30
        version = None
        while time.monotonic() < deadline and version != "det-late":
            version = predict(b, [{"data": {"image": "/" + scenes[0].name}}]).json()["model_version"]
            time.sleep(0.2)
        assert version == "det-late"
        (item,) = predict(b, [{"data": {"image": "/" + scenes[0].name}}]).json()["results"]
        assert item["model_version"] == "det-late" and item["result"]
        assert requests.get(b.url + "/health", timeout=5).json()["default_model_version"] == "det-late"
    finally:
        b.stop()


def test_basic_auth_guards_every_route(tmp_path, redis_url):
    b = start_backend(
        tmp_path,
        {
            "MODEL_DIR": str(tmp_path / "m"),
            "REDIS_URL": redis_url,
            "BASIC_AUTH_USER": "ls",
            "BASIC_AUTH_PASS": "s3cret-pass",
        },
    )
    try:
        for method, path in (
            ("get", "/health"),
            ("post", "/setup"),
            ("post", "/predict"),
            ("post", "/webhook"),
        ):
            r = requests.request(method, b.url + path, json={}, timeout=5)
            assert r.status_code == 401, path
            assert r.headers["WWW-Authenticate"].startswith("Basic")
            r = requests.request(method, b.url + path, json={}, auth=("ls", "wrong"), timeout=5)
            assert r.status_code == 401, path
        assert requests.get(b.url + "/health", auth=("ls", "s3cret-pass"), timeout=5).status_code == 200
        r = requests.post(
            b.url + "/setup", json={"schema": DETECT_CONFIG}, auth=("ls", "s3cret-pass"), timeout=5
        )
        assert r.status_code == 200
    finally:
        b.stop()
    assert "s3cret-pass" not in b.log.read_text()


def test_redis_down_is_reported_not_fatal(tmp_path):
    b = start_backend(tmp_path, {"MODEL_DIR": str(tmp_path / "m"), "REDIS_URL": "redis://127.0.0.1:9/0"})
    try:
        r = requests.get(b.url + "/health", timeout=5)
        assert r.status_code == 200 and r.json()["redis"] is False
    finally:
        b.stop()


def test_invalid_settings_fail_at_start_naming_the_setting(tmp_path: Path):
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "annoloop"
    bad = tmp_path / "bad.yaml"
    bad.write_text("inference:\n  prelabel_conf: 2\n")
    r = subprocess.run(
        [str(exe), "serve"],
        env={"ANNOLOOP_CONFIG": str(bad), "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "inference.prelabel_conf" in r.stderr
