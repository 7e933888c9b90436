"""RFC 9458 Appendix A, byte for byte: key configuration, binary HTTP, request and response.

The hex values are the RFC's (Appendix A, "Complete Example of a Request and
Response"), committed here so nothing is downloaded at test time.
"""
from __future__ import annotations

import hashlib
import hmac

import pytest

from edge_client.errors import EncapsulationError
from edge_client.protocol import bhttp, ohttp

h = bytes.fromhex
SKR = h("3c168975674b2fa8e465970b79c8dcf09f1c741626480bd4c6162fc5b6a98e1a")
KEY_CONFIG = h("01002031e1f05a740102115220e9af918f738674aec95f54db6e04eb705aae8e79815500080001000100010003")
BHTTP_REQUEST = h("00034745540568747470730b6578616d706c652e636f6d012f")
SKE = h("bc51d5e930bda26589890ac7032f70ad12e4ecb37abb1b65b1256c9c48999c73")
PKE = h("4b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad19dec96c208b472")
ENC_REQUEST = h("010020000100014b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad19dec96c208b472"
                "6374e469135906992e1268c594d2a10c695d858c40a026e7965e7d86b83dd440b2c0185204b4d63525")
BHTTP_RESPONSE = h("0140c8")
EXPORT_SECRET = h("62d87a6ba569ee81014c2641f52bea36")
RESPONSE_NONCE = h("c789e7151fcba46158ca84b04464910d")
PRK = h("979aaeae066cf211ab407b31ae49767f344e1501e475c84e8aff547cc5a683db")
AEAD_KEY = h("5d0172a080e428b16d298c4ea0db620d")
AEAD_NONCE = h("f6bf1aeb88d6df87007fa263")
ENC_RESPONSE = h("c789e7151fcba46158ca84b04464910d86f9013e404feea014e7be4a441f234f857fbd")

CONFIG = ohttp.KeyConfig(1, ohttp.public_key(SKR), ((0x0001, 0x0001), (0x0001, 0x0003)))


def test_key_configuration() -> None:
    assert CONFIG.encode() == KEY_CONFIG and ohttp.KeyConfig.decode(KEY_CONFIG) == CONFIG
    listed = ohttp.encode_key_configs([CONFIG, CONFIG])
    assert listed[:2] == len(KEY_CONFIG).to_bytes(2, "big") and ohttp.decode_key_configs(listed) == [CONFIG, CONFIG]


def test_binary_http_messages() -> None:
    request = bhttp.Request("GET", "/", "https", "example.com")
    assert bhttp.encode_request(request) == BHTTP_REQUEST and bhttp.decode_request(BHTTP_REQUEST) == request
    assert bhttp.encode_response(bhttp.Response(200)) == BHTTP_RESPONSE
    assert bhttp.decode_response(BHTTP_RESPONSE) == bhttp.Response(200)


def test_request_encapsulation_with_the_rfcs_ephemeral_key() -> None:
    encapsulated, _ = ohttp.encapsulate_request(CONFIG, BHTTP_REQUEST, ohttp.AES_128_GCM, ephemeral_private=SKE)
    assert encapsulated[7:39] == PKE and encapsulated == ENC_REQUEST
    message, _ = ohttp.decapsulate_request(ENC_REQUEST, {1: (CONFIG, SKR)})
    assert message == BHTTP_REQUEST


def test_response_encapsulation() -> None:
    _, context = ohttp.decapsulate_request(ENC_REQUEST, {1: (CONFIG, SKR)})
    assert context.hpke.export(ohttp.RESPONSE_LABEL, 16) == EXPORT_SECRET
    assert hmac.new(PKE + RESPONSE_NONCE, EXPORT_SECRET, hashlib.sha256).digest() == PRK  # HKDF-Extract
    assert ohttp.response_keys(context, RESPONSE_NONCE) == (AEAD_KEY, AEAD_NONCE)
    assert ohttp.encapsulate_response(context, BHTTP_RESPONSE, RESPONSE_NONCE) == ENC_RESPONSE
    _, client = ohttp.encapsulate_request(CONFIG, BHTTP_REQUEST, ohttp.AES_128_GCM, ephemeral_private=SKE)
    assert ohttp.decapsulate_response(client, ENC_RESPONSE) == BHTTP_RESPONSE


@pytest.mark.parametrize("aead", [ohttp.AES_128_GCM, ohttp.AES_256_GCM, ohttp.CHACHA20_POLY1305])
def test_every_aead_round_trips(aead: int) -> None:
    private = ohttp.generate_private_key()
    config = ohttp.KeyConfig(7, ohttp.public_key(private))
    request = bhttp.Request("POST", "/v1/candidates", headers=(("content-type", "application/json"),),
                            content=b'{"cells":[1]}')
    sealed, client = ohttp.encapsulate_request(config, bhttp.encode_request(request), aead)
    message, gateway = ohttp.decapsulate_request(sealed, {7: (config, private)})
    assert bhttp.decode_request(message) == request
    answer = bhttp.Response(404, (("content-type", "application/json"),), b"{}")
    assert bhttp.decode_response(ohttp.decapsulate_response(
        client, ohttp.encapsulate_response(gateway, bhttp.encode_response(answer)))) == answer


def test_indeterminate_length_messages_and_padding_parse() -> None:
    request = (b"\x02" + b"\x04POST\x05https\x00\x0e/v1/candidates" + b"\x0ccontent-type\x10application/json\x00"
               + b"\x02{}\x01\x00\x00" + b"\x00" + b"\x00\x00\x00")
    parsed = bhttp.decode_request(request)
    assert parsed.method == "POST" and parsed.header("Content-Type") == "application/json" and parsed.content == b"{}\x00"
    response = b"\x03\x40\x64\x00" + b"\x40\xc8\x00" + b"\x02ok\x00" + b"\x00"
    assert bhttp.decode_response(response) == bhttp.Response(200, (), b"ok")


@pytest.mark.parametrize("bad", [ENC_REQUEST[:-1], ENC_REQUEST[:20], b"",
                                 ENC_REQUEST[:50] + bytes([ENC_REQUEST[50] ^ 1]) + ENC_REQUEST[51:]])
def test_tampered_or_truncated_requests_are_refused(bad: bytes) -> None:
    with pytest.raises(EncapsulationError) as caught:
        ohttp.decapsulate_request(bad, {1: (CONFIG, SKR)})
    assert caught.value.code == "bad_ohttp_message"


def test_unknown_key_id_is_a_key_error() -> None:
    with pytest.raises(EncapsulationError) as caught:
        ohttp.decapsulate_request(b"\x02" + ENC_REQUEST[1:], {1: (CONFIG, SKR)})
    assert caught.value.code == "ohttp_key"


@pytest.mark.parametrize("bad", [b"\x05", b"\x00\x03GET", BHTTP_REQUEST + b"\x01"])
def test_malformed_binary_http_is_refused(bad: bytes) -> None:
    with pytest.raises(EncapsulationError):
        bhttp.decode_request(bad)
