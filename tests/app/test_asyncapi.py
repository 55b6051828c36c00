"""The AsyncAPI 3.0 document, its YAML form, the CLI commands and the docs page in Chromium."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import jsonschema
import pytest
import yaml
from examples.orders import app as orders_app
from pydantic import BaseModel, Field
from pydantic_core import core_schema

from amgi.app import App, AppDefinitionError, Binding, Depends, Header, Outgoing
from amgi.app._docs import DocsServer, render_page
from amgi.app._yaml import to_yaml
from tests.cli import amgi as amgi_cli
from tests.net import free_port

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / ".brokers/npm/node_modules/@asyncapi/specs/schemas/3.0.0.json"
ARTIFACTS = ROOT / "test-artifacts"


def official_validator() -> Any:
    assert SPEC.is_file(), f"{SPEC} is missing: run bash scripts/docs-tools.sh"
    schema = json.loads(SPEC.read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def errors_of(document: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
        for e in official_validator().iter_errors(document)
    ]


class Reading(BaseModel):
    sensor: str
    celsius: float


def sensor_app() -> App:
    app = App(title="sensors", version="2.1.0")

    @app.subscriber(
        "sensors.{site}.{kind}", publish_to="alerts", examples=[Reading(sensor="a", celsius=1.5)]
    )
    async def on_reading(
        reading: Reading,
        site: str,
        kind: int,
        unit: Annotated[str, Header("unit", "measurement unit")],
        key: Annotated[bytes | None, Binding("kafka", "key")] = None,
    ) -> Reading | None:
        """Forward hot readings."""
        return reading if reading.celsius > 40 else None

    @app.subscriber("batch", batch=True)
    async def on_batch(readings: list[Reading]) -> None: ...

    return app


def test_example_document_validates_against_the_official_schema() -> None:
    document = orders_app.asyncapi()
    assert errors_of(document) == []
    assert document["asyncapi"] == "3.0.0"
    assert document["info"] == {
        "title": "orders",
        "version": "1.0.0",
        "description": "Turns orders into invoices.",
    }
    addresses = {c["address"] for c in document["channels"].values()}
    assert addresses == {"orders.{region}", "invoices"}
    actions = {k: v["action"] for k, v in document["operations"].items()}
    assert actions == {"on_order": "receive", "on_order.publish": "send", "on_invoice": "receive"}
    order_message = document["components"]["messages"]["on_order.message"]
    assert order_message["payload"] == {"$ref": "#/components/schemas/Order"}
    assert (
        order_message["headers"]["properties"]["trace-id"]["description"] == "the caller's trace id"
    )
    assert document["components"]["schemas"]["Line"]["properties"]["qty"]["exclusiveMinimum"] == 0


def test_the_validator_rejects_a_broken_document() -> None:
    document = orders_app.asyncapi()
    document["operations"]["on_order"]["action"] = "consume"
    del document["info"]["version"]
    found = errors_of(document)
    assert found, "the official schema accepted a broken document"


def test_parameters_headers_bindings_examples() -> None:
    document = sensor_app().asyncapi()
    assert errors_of(document) == []
    (channel,) = [c for c in document["channels"].values() if c["address"].startswith("sensors")]
    assert channel["parameters"] == {
        "site": {"description": "address parameter site (str)"},
        "kind": {"description": "address parameter kind (int)"},
    }
    message = document["components"]["messages"]["on_reading.message"]
    assert message["headers"] == {
        "type": "object",
        "properties": {"unit": {"type": "string", "description": "measurement unit"}},
        "required": ["unit"],
    }
    assert message["bindings"]["kafka"]["key"] == {"type": "string", "format": "binary"}
    assert message["examples"] == [{"payload": {"sensor": "a", "celsius": 1.5}}]
    assert document["operations"]["on_reading"]["description"] == "Forward hot readings."
    assert document["operations"]["on_batch"]["x-amgi-batch"] is True
    sent = document["operations"]["on_reading.publish"]
    assert sent["channel"] == {"$ref": "#/channels/alerts"}


class Cat(BaseModel):
    kind: Literal["cat"]
    meow: bool


class Dog(BaseModel):
    kind: Literal["dog"]
    bark: bool


Pet = Annotated[Cat | Dog, Field(discriminator="kind")]


class Shelter(BaseModel):
    discriminator: str  # a field of that name is not the keyword
    pets: list[Pet]


def test_discriminated_unions_validate_and_titles_read_well() -> None:
    app = App()

    @app.subscriber("pets")
    async def on_pet(pet: Pet) -> None: ...

    @app.subscriber("shelters", publish_to="maybe")
    async def on_shelter(shelter: Shelter) -> Optional[Shelter]: ...  # noqa: UP045

    @app.subscriber("lists")
    async def on_list(cats: list[Cat] | None) -> None: ...

    document = app.asyncapi()
    assert errors_of(document) == []
    messages = document["components"]["messages"]
    assert messages["on_pet.message"]["payload"] == {
        "oneOf": [{"$ref": "#/components/schemas/Cat"}, {"$ref": "#/components/schemas/Dog"}],
        "discriminator": "kind",
    }
    shelter = document["components"]["schemas"]["Shelter"]
    assert shelter["properties"]["discriminator"] == {"title": "Discriminator", "type": "string"}
    assert shelter["properties"]["pets"]["items"]["discriminator"] == "kind"
    titles = {k: m["title"] for k, m in messages.items()}
    assert titles == {
        "on_pet.message": "Cat | Dog",
        "on_shelter.message": "Shelter",
        "on_shelter.result": "Shelter",
        "on_list.message": "list[Cat] | None",
    }


def test_content_type_of_raw_payloads_and_results() -> None:
    app = App()

    @app.subscriber("images", publish_to="thumbnails")
    async def on_image(image: bytes | None) -> bytes: ...

    @app.subscriber("text", publish_to="lines")
    async def on_text(text: Annotated[str, Field(max_length=9)]) -> str | None: ...

    @app.subscriber("orders", publish_to="out")
    async def on_order(order: Reading) -> Reading: ...

    document = app.asyncapi()
    assert errors_of(document) == []
    types = {k: m["contentType"] for k, m in document["components"]["messages"].items()}
    assert types == {
        "on_image.message": "application/octet-stream",
        "on_image.result": "application/octet-stream",
        "on_text.message": "text/plain",
        "on_text.result": "text/plain",
        "on_order.message": "application/json",
        "on_order.result": "application/json",
    }


def test_address_parameters_of_dependencies_and_publish_to() -> None:
    def shard_db(shard: int) -> str:
        return f"db{shard}"

    app = App()

    @app.subscriber("events.{region}.{shard}", publish_to="done.{region}")
    async def on_event(body: bytes, db: Annotated[str, Depends(shard_db)]) -> bytes: ...

    document = app.asyncapi()
    assert errors_of(document) == []
    channels = {c["address"]: c.get("parameters") for c in document["channels"].values()}
    assert channels == {
        "events.{region}.{shard}": {
            "region": {"description": "address parameter region (str)"},
            "shard": {"description": "address parameter shard (int)"},
        },
        "done.{region}": {"region": {"description": "address parameter region (str)"}},
    }


def test_publish_to_parameters_given_by_the_result() -> None:
    app = App()

    @app.subscriber("readings.{region}", publish_to="alerts.{region}.{sensor}")
    async def on_reading(reading: Reading) -> Outgoing[Reading]:
        return Outgoing(reading, params={"sensor": reading.sensor})

    document = app.asyncapi()
    assert errors_of(document) == []
    channels = {c["address"]: c.get("parameters") for c in document["channels"].values()}
    assert channels["alerts.{region}.{sensor}"] == {
        "region": {"description": "address parameter region (str)"},
        "sensor": {
            "description": "address parameter sensor (given by the result's Outgoing params)"
        },
    }


class Money:
    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        return core_schema.no_info_plain_validator_function(lambda v: v)


class Priced(BaseModel):
    total: Money


def test_a_type_without_json_schema_is_named_with_its_handler() -> None:
    app = App()

    @app.subscriber("in")
    async def on_in(order: Reading, price: Annotated[Priced, Header("price")]) -> None: ...

    with pytest.raises(AppDefinitionError) as info:
        app.asyncapi()
    message = str(info.value)
    assert message.startswith(
        "test_a_type_without_json_schema_is_named_with_its_handler.<locals>.on_in, parameter "
        "'price': Priced has no JSON Schema for the AsyncAPI document "
        "(PydanticInvalidForJsonSchema: Cannot generate a JsonSchema for "
    )
    assert message.endswith("; describe it with pydantic's WithJsonSchema")


class Limits(BaseModel):
    high: float = math.inf
    low: float = -math.inf
    unset: float = math.nan


def test_infinite_and_nan_numbers_are_strings_in_valid_json() -> None:
    app = App()

    @app.subscriber("limits", examples=[Limits(high=1)])
    async def on_limits(limits: Limits) -> None: ...

    document = app.asyncapi()
    text = json.dumps(document, allow_nan=False)  # raises on a number JSON cannot hold
    assert errors_of(json.loads(text)) == []
    schema = document["components"]["schemas"]["Limits"]["properties"]
    defaults = {name: field["default"] for name, field in schema.items()}
    assert defaults == {"high": "Infinity", "low": "-Infinity", "unset": "NaN"}
    # Pydantic reads the strings back as the declared defaults.
    back = Limits.model_validate_json(json.dumps(defaults))
    assert (back.high, back.low, math.isnan(back.unset)) == (math.inf, -math.inf, True)
    (example,) = document["components"]["messages"]["on_limits.message"]["examples"]
    assert example == {"payload": {"high": 1.0, "low": "-Infinity", "unset": "NaN"}}
    assert yaml.safe_load(to_yaml(document)) == json.loads(text)


def test_yaml_is_the_same_document() -> None:
    document = sensor_app().asyncapi()
    assert yaml.safe_load(to_yaml(document)) == json.loads(json.dumps(document))
    tricky = {"a": ["yes", "x: y", "", "#", "1.0", None, True, [], {}], "b": {"c": [{"d": [1]}]}}
    assert yaml.safe_load(to_yaml(tricky)) == tricky


def test_yaml_reads_back_every_string() -> None:
    # Line breaks at the end, YAML indicators, and what JSON leaves raw but YAML refuses.
    alphabet = "aZ09_ /$#{}.-:?&*!|>'%@`[],\"\\\t\n\r~=<+\x7f\x85\u2028\ufeff\ud800\U0001f600"
    cases = ["a\n", "a\n\n", "\n", "key\n", "x \n", "Yes", "-1", "1e3", "é"]
    rng = random.Random(0)
    cases += ["".join(rng.choices(alphabet, k=rng.randint(0, 6))) for _ in range(1000)]
    for text in cases:
        document = {text: text, "list": [text, {"k": text}]}
        assert yaml.safe_load(to_yaml(document)) == document, repr(text)
    assert yaml.safe_load(to_yaml("a\n")) == "a\n"


def test_cli_prints_the_document() -> None:
    as_json = amgi_cli("asyncapi", "examples.orders:app")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == json.loads(json.dumps(orders_app.asyncapi()))
    as_yaml = amgi_cli("asyncapi", "examples.orders:app", "--yaml")
    assert yaml.safe_load(as_yaml.stdout) == json.loads(as_json.stdout)
    wrong = amgi_cli("asyncapi", "examples.hello:app")
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == (
        "amgi: error: 'examples.hello:app' is not an amgi.app.App (got function); "
        "AsyncAPI documents come from the typed layer"
    )


def test_cli_docs_serves_the_page() -> None:
    import urllib.request

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "amgi", "docs", "examples.orders:app", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == f"amgi docs: serving http://127.0.0.1:{port}/ (Ctrl-C to stop)"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            page = r.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/asyncapi.json", timeout=10) as r:
            assert json.loads(r.read())["info"]["title"] == "orders"
    finally:
        proc.terminate()
        proc.wait(10)
    assert "orders.{region}" in page
    assert "<script" not in page
    assert "http" not in page.split("<body>", 1)[0]


def test_page_is_self_contained() -> None:
    page = render_page(orders_app.asyncapi())
    assert "<script" not in page
    assert "src=" not in page
    assert "://" not in page  # no link or asset from elsewhere


@pytest.mark.timeout(90)
def test_docs_page_in_headless_chromium() -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(exist_ok=True)
    # One file per Python version: scripts/test runs the versions side by side, and one
    # run's screenshot truncated the file while another read its size (0 bytes).
    shot = ARTIFACTS / f"asyncapi-docs-py{sys.version_info.major}.{sys.version_info.minor}.png"
    server = DocsServer(orders_app.asyncapi(), "127.0.0.1", 0)
    server.start()
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as profile:
        for flag in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--window-size=1280,2400",
            f"--user-data-dir={profile}",
        ):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
        try:
            driver.get(server.url)
            channels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "h3.address")]
            assert "orders.{region}" in channels
            assert "invoices" in channels
            fields = [
                e for e in driver.find_elements(By.CSS_SELECTOR, "td.field") if e.is_displayed()
            ]
            names = {e.text.replace("required", "").strip() for e in fields}
            assert {"customer", "lines[].qty", "trace-id", "total"} <= names
            order = driver.find_element(By.ID, "op-on_order")
            assert "RECEIVE" in order.text
            assert "lines[].sku" in order.text
            assert "product code" in order.text
            assert driver.save_screenshot(str(shot))
        finally:
            driver.quit()
            server.stop()
    assert shot.stat().st_size > 10_000


class Unknown:
    """A class pydantic knows nothing about."""


def test_an_example_that_does_not_fit_the_payload_type_is_named() -> None:
    app = App()

    @app.subscriber("limits", examples=[Limits(high=1), {"high": "very"}])
    async def on_limits(limits: Limits) -> None: ...

    with pytest.raises(AppDefinitionError) as info:
        app.asyncapi()
    assert str(info.value).endswith(
        ".on_limits, examples[1]: not a valid Limits (the app would refuse it): "
        "high: Input should be a valid number, unable to parse string as a number"
    )


def test_an_example_that_cannot_be_written_as_json_is_named() -> None:
    app = App()

    @app.subscriber("raw", examples=[Unknown()])
    async def on_raw(meta: Annotated[str, Header("kind")]) -> None: ...

    with pytest.raises(AppDefinitionError) as info:
        app.asyncapi()
    message = str(info.value)
    assert ".on_raw, examples[0]: cannot be written as JSON (PydanticSchemaGenerationError: " in (
        message
    )
    assert "\n" not in message
