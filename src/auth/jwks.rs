//! JSON Web Keys (RFC 7517, 7518): a JWKS, inline or fetched, turned once into ready verifiers.
//! A key's type and `alg` fix which algorithms it verifies; a token's header never widens that.

use std::collections::HashSet;
use std::fmt;

use jwt_simple::prelude::*;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{decode_base64url, SecretString};
use crate::common::ConfigError;

/// A JWK Set: `{"keys": [...]}`. Members other than `keys` are ignored, as RFC 7517 §5 requires.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
pub struct RawJwks {
    pub keys: Vec<RawJwk>,
}

/// One JSON Web Key. Unknown members (`x5c`, `x5t`, `key_ops`, …) are ignored rather than refused:
/// RFC 7517 §4 requires it, and a JWKS copied from an identity provider carries them.
#[derive(Debug, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
pub struct RawJwk {
    /// Key type: `RSA`, `EC` (curves `P-256`, `P-384`), `OKP` (curve `Ed25519`) or `oct`.
    pub kty: String,
    /// Key id, matched against a token's `kid` header.
    #[serde(default)]
    pub kid: Option<String>,
    /// The one algorithm this key verifies. Omitted: every algorithm of the key's type and size
    /// (RSA: RS256, RS384, RS512, PS256; oct: the HS algorithms its length allows).
    #[serde(default)]
    pub alg: Option<String>,
    /// `sig`, or omitted. Encryption keys (`enc`) are refused.
    #[serde(default, rename = "use")]
    pub key_use: Option<String>,
    /// Curve of an `EC` or `OKP` key.
    #[serde(default)]
    pub crv: Option<String>,
    /// RSA modulus, base64url.
    #[serde(default)]
    pub n: Option<String>,
    /// RSA public exponent, base64url.
    #[serde(default)]
    pub e: Option<String>,
    /// EC x coordinate or Ed25519 public key, base64url.
    #[serde(default)]
    pub x: Option<String>,
    /// EC y coordinate, base64url.
    #[serde(default)]
    pub y: Option<String>,
    /// Symmetric (`oct`) key, base64url.
    #[serde(default)]
    pub k: Option<SecretString>,
}

/// A JWS algorithm the filter verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Algorithm {
    HS256,
    HS384,
    HS512,
    RS256,
    RS384,
    RS512,
    PS256,
    ES256,
    ES384,
    EdDSA,
}

const RSA_FAMILY: [Algorithm; 4] = [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512, Algorithm::PS256];
const HMAC_FAMILY: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
const ALGORITHM_NAMES: &str = "HS256, HS384, HS512, RS256, RS384, RS512, PS256, ES256, ES384, EdDSA";

/// RFC 7518 §3.3: smaller moduli are refused; larger ones would let a JWKS make each verification
/// arbitrarily slow.
const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=4096;

impl Algorithm {
    /// The JOSE name; `none` and anything unknown give `None`.
    pub fn from_name(name: &str) -> Option<Algorithm> {
        use Algorithm::*;
        Some(match name {
            "HS256" => HS256,
            "HS384" => HS384,
            "HS512" => HS512,
            "RS256" => RS256,
            "RS384" => RS384,
            "RS512" => RS512,
            "PS256" => PS256,
            "ES256" => ES256,
            "ES384" => ES384,
            "EdDSA" => EdDSA,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use Algorithm::*;
        match self {
            HS256 => "HS256",
            HS384 => "HS384",
            HS512 => "HS512",
            RS256 => "RS256",
            RS384 => "RS384",
            RS512 => "RS512",
            PS256 => "PS256",
            ES256 => "ES256",
            ES384 => "ES384",
            EdDSA => "EdDSA",
        }
    }

    /// RFC 7518 §3.2: an HMAC key at least as long as the hash output.
    fn min_hmac_bytes(self) -> usize {
        match self {
            Algorithm::HS384 => 48,
            Algorithm::HS512 => 64,
            _ => 32,
        }
    }
}

/// The claims of a verified token: the registered ones jwt-simple decodes, the rest as JSON.
pub(crate) type Claims = JWTClaims<Map<String, Value>>;

/// A ready verifier: the decoded key for exactly one algorithm.
enum Verifier {
    HS256(HS256Key),
    HS384(HS384Key),
    HS512(HS512Key),
    RS256(RS256PublicKey),
    RS384(RS384PublicKey),
    RS512(RS512PublicKey),
    PS256(PS256PublicKey),
    ES256(ES256PublicKey),
    ES384(ES384PublicKey),
    EdDSA(Ed25519PublicKey),
}

/// One key for one algorithm. A JWK that allows several algorithms becomes several `Key`s with
/// the same `kid`.
pub(crate) struct Key {
    kid: Option<String>,
    verifier: Verifier,
}

/// Never prints key material, so a logged config or key set cannot leak an HMAC secret.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key").field("kid", &self.kid).field("alg", &self.algorithm().name()).finish()
    }
}

impl Key {
    pub(crate) fn algorithm(&self) -> Algorithm {
        match &self.verifier {
            Verifier::HS256(_) => Algorithm::HS256,
            Verifier::HS384(_) => Algorithm::HS384,
            Verifier::HS512(_) => Algorithm::HS512,
            Verifier::RS256(_) => Algorithm::RS256,
            Verifier::RS384(_) => Algorithm::RS384,
            Verifier::RS512(_) => Algorithm::RS512,
            Verifier::PS256(_) => Algorithm::PS256,
            Verifier::ES256(_) => Algorithm::ES256,
            Verifier::ES384(_) => Algorithm::ES384,
            Verifier::EdDSA(_) => Algorithm::EdDSA,
        }
    }

    /// Checks the signature, then the time claims; jwt-simple refuses a header `alg` other than
    /// this key's before it looks at the signature.
    pub(crate) fn verify(&self, token: &str, options: VerificationOptions) -> Result<Claims, jwt_simple::Error> {
        let options = Some(options);
        match &self.verifier {
            Verifier::HS256(k) => k.verify_token(token, options),
            Verifier::HS384(k) => k.verify_token(token, options),
            Verifier::HS512(k) => k.verify_token(token, options),
            Verifier::RS256(k) => k.verify_token(token, options),
            Verifier::RS384(k) => k.verify_token(token, options),
            Verifier::RS512(k) => k.verify_token(token, options),
            Verifier::PS256(k) => k.verify_token(token, options),
            Verifier::ES256(k) => k.verify_token(token, options),
            Verifier::ES384(k) => k.verify_token(token, options),
            Verifier::EdDSA(k) => k.verify_token(token, options),
        }
    }

    /// An HMAC key for `alg`, which must be an HS algorithm.
    pub(crate) fn hmac(kid: Option<String>, alg: Algorithm, secret: &[u8], path: &str) -> Result<Key, ConfigError> {
        let verifier = match alg {
            Algorithm::HS256 => Verifier::HS256(HS256Key::from_bytes(secret)),
            Algorithm::HS384 => Verifier::HS384(HS384Key::from_bytes(secret)),
            Algorithm::HS512 => Verifier::HS512(HS512Key::from_bytes(secret)),
            other => return Err(ConfigError::at(path, format!("{} is not an HMAC algorithm", other.name()))),
        };
        if secret.len() < alg.min_hmac_bytes() {
            return Err(ConfigError::at(
                path,
                format!(
                    "an {} secret must be at least {} bytes, this one has {}",
                    alg.name(),
                    alg.min_hmac_bytes(),
                    secret.len()
                ),
            ));
        }
        Ok(Key { kid, verifier })
    }
}

/// A provider's keys, in the order given.
#[derive(Debug, Default)]
pub(crate) struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub(crate) fn push(&mut self, key: Key) {
        self.keys.push(key);
    }

    /// Keys a token with `kid` may be signed with: those with that kid, and keys without one
    /// (as Envoy's `jwt_authn` does). A token without `kid` may use any key.
    pub(crate) fn candidates<'a>(&'a self, kid: Option<&'a str>) -> impl Iterator<Item = &'a Key> + 'a {
        self.keys.iter().filter(move |k| kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid)
    }
}

/// The outcome of parsing a fetched JWKS document.
#[derive(Debug)]
pub(crate) struct JwksLoad {
    pub(crate) keys: KeySet,
    /// Keys left out because they are unusable or malformed, with the reason; worth a log line.
    pub(crate) skipped: Vec<ConfigError>,
}

/// Parses a JWKS fetched from an identity provider. Keys the filter cannot use are skipped, not
/// fatal (RFC 7517 §5 asks for that, and one odd key must not take a provider down); a document
/// without a single usable key is an error, so the caller keeps its last good set.
pub(crate) fn parse_remote_jwks(body: &[u8]) -> Result<JwksLoad, ConfigError> {
    // Through serde_path_to_error like the plugin config, which also shares the deserializer
    // code for `RawJwks` with the inline JWKS instead of compiling it twice.
    let mut de = serde_json::Deserializer::from_slice(body);
    let raw: RawJwks = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { "$" } else { path.as_str() };
        // serde_json's " at line L column C" says nothing useful about a document nobody sees.
        let message = e.inner().to_string();
        let message = message.rfind(" at line ").map_or(message.as_str(), |i| &message[..i]);
        ConfigError::at(path, format!("not a JWKS document: {message}"))
    })?;
    let mut load = JwksLoad { keys: KeySet::default(), skipped: Vec::new() };
    let mut seen = HashSet::new();
    for (i, jwk) in raw.keys.iter().enumerate() {
        let path = format!("keys[{i}]");
        if jwk.kty == "oct" {
            // A symmetric key published at a URL is a secret anyone who can answer that URL (or
            // read it) can sign with: HMAC keys belong in the config's `secrets` only.
            load.skipped.push(ConfigError::at(format!("{path}.kty"), "an oct key from a remote JWKS is never used"));
            continue;
        }
        match compile_jwk(jwk, &path, &mut seen) {
            Ok(keys) => load.keys.keys.extend(keys),
            Err(e) => load.skipped.push(e),
        }
    }
    if load.keys.is_empty() {
        return Err(ConfigError::at("keys", "no usable signing key"));
    }
    Ok(load)
}

/// An inline JWKS from the config: every key must be usable, or the config is refused.
pub(crate) fn compile_inline(raw: &RawJwks, path: &str, seen: &mut HashSet<String>) -> Result<KeySet, ConfigError> {
    let mut set = KeySet::default();
    for (i, jwk) in raw.keys.iter().enumerate() {
        set.keys.extend(compile_jwk(jwk, &format!("{path}.keys[{i}]"), seen)?);
    }
    Ok(set)
}

/// One JWK as the keys for each algorithm it may verify. `seen` collects kids across the set.
fn compile_jwk(jwk: &RawJwk, path: &str, seen: &mut HashSet<String>) -> Result<Vec<Key>, ConfigError> {
    let at = |field: &str, message: String| ConfigError::at(format!("{path}.{field}"), message);
    if let Some(key_use) = jwk.key_use.as_deref().filter(|u| *u != "sig") {
        return Err(at("use", format!("is {key_use:?}; only signature keys (\"sig\") verify tokens")));
    }
    if jwk.kid.as_deref() == Some("") {
        return Err(at("kid", "must not be empty".to_owned()));
    }
    let keys = compile_key_material(jwk, path)?;
    if let Some(kid) = &jwk.kid {
        // Recorded only once the key compiled, so a skipped remote key does not shadow a good one.
        if !seen.insert(kid.clone()) {
            return Err(at("kid", format!("{kid:?} is used by another key of this provider")));
        }
    }
    Ok(keys)
}

fn compile_key_material(jwk: &RawJwk, path: &str) -> Result<Vec<Key>, ConfigError> {
    let at = |field: &str, message: String| ConfigError::at(format!("{path}.{field}"), message);
    let declared = match jwk.alg.as_deref() {
        Some(name) => Some(
            Algorithm::from_name(name)
                .ok_or_else(|| at("alg", format!("unknown algorithm {name:?}; expected one of {ALGORITHM_NAMES}")))?,
        ),
        None => None,
    };
    let allowed = |family: &[Algorithm]| -> Result<Vec<Algorithm>, ConfigError> {
        match declared {
            Some(alg) if family.contains(&alg) => Ok(vec![alg]),
            Some(alg) => Err(at("alg", format!("{} does not fit a key of type {:?}", alg.name(), jwk.kty))),
            None => Ok(family.to_vec()),
        }
    };
    let field = |name: &str, value: Option<&str>| -> Result<Vec<u8>, ConfigError> {
        let value = value.ok_or_else(|| at(name, format!("is required for a key of type {:?}", jwk.kty)))?;
        decode_base64url(value).ok_or_else(|| at(name, "not valid base64url".to_owned()))
    };
    let kid = jwk.kid.clone();
    let key = |verifier| Key { kid: kid.clone(), verifier };

    match jwk.kty.as_str() {
        "RSA" => {
            let algs = allowed(&RSA_FAMILY)?;
            let n = field("n", jwk.n.as_deref())?;
            let e = field("e", jwk.e.as_deref())?;
            let bits = significant_bits(&n);
            if !RSA_BITS.contains(&bits) {
                return Err(at(
                    "n",
                    format!(
                        "an RSA modulus of {bits} bits; {} to {} bits are accepted",
                        RSA_BITS.start(),
                        RSA_BITS.end()
                    ),
                ));
            }
            let invalid = |_| at("n", "not a valid RSA public key".to_owned());
            algs.into_iter()
                .map(|alg| {
                    Ok(key(match alg {
                        Algorithm::RS256 => Verifier::RS256(RS256PublicKey::from_components(&n, &e).map_err(invalid)?),
                        Algorithm::RS384 => Verifier::RS384(RS384PublicKey::from_components(&n, &e).map_err(invalid)?),
                        Algorithm::RS512 => Verifier::RS512(RS512PublicKey::from_components(&n, &e).map_err(invalid)?),
                        // `allowed` kept `algs` within RSA_FAMILY: this is PS256.
                        _ => Verifier::PS256(PS256PublicKey::from_components(&n, &e).map_err(invalid)?),
                    }))
                })
                .collect()
        }
        "EC" => {
            let (alg, size) = match jwk.crv.as_deref() {
                Some("P-256") => (Algorithm::ES256, 32),
                Some("P-384") => (Algorithm::ES384, 48),
                other => return Err(at("crv", format!("{other:?} is not a supported curve; expected P-256 or P-384"))),
            };
            allowed(&[alg])?;
            let x = field("x", jwk.x.as_deref())?;
            let y = field("y", jwk.y.as_deref())?;
            for (name, coordinate) in [("x", &x), ("y", &y)] {
                if coordinate.len() != size {
                    return Err(at(name, format!("must be {size} bytes for this curve, not {}", coordinate.len())));
                }
            }
            // SEC1 uncompressed point: 0x04 || x || y.
            let point = [&[4u8][..], &x, &y].concat();
            let not_on_curve = |_| at("x", "not a point on the curve".to_owned());
            let verifier = match alg {
                Algorithm::ES256 => Verifier::ES256(ES256PublicKey::from_bytes(&point).map_err(not_on_curve)?),
                _ => Verifier::ES384(ES384PublicKey::from_bytes(&point).map_err(not_on_curve)?),
            };
            Ok(vec![key(verifier)])
        }
        "OKP" => {
            if jwk.crv.as_deref() != Some("Ed25519") {
                return Err(at("crv", format!("{:?} is not a supported curve; expected Ed25519", jwk.crv)));
            }
            allowed(&[Algorithm::EdDSA])?;
            let x = field("x", jwk.x.as_deref())?;
            let public = Ed25519PublicKey::from_bytes(&x)
                .map_err(|_| at("x", format!("must be a 32-byte Ed25519 public key, not {} bytes", x.len())))?;
            Ok(vec![key(Verifier::EdDSA(public))])
        }
        "oct" => {
            let algs = allowed(&HMAC_FAMILY)?;
            let secret = field("k", jwk.k.as_ref().map(SecretString::expose))?;
            // Without a declared alg, only the HS algorithms the secret is long enough for.
            let algs: Vec<Algorithm> = match declared {
                Some(_) => algs,
                None => algs.into_iter().filter(|a| secret.len() >= a.min_hmac_bytes()).collect(),
            };
            if algs.is_empty() {
                return Err(at(
                    "k",
                    format!("an HMAC secret must be at least 32 bytes, this one has {}", secret.len()),
                ));
            }
            let path_k = format!("{path}.k");
            algs.into_iter().map(|alg| Key::hmac(kid.clone(), alg, &secret, &path_k)).collect()
        }
        other => Err(at("kty", format!("{other:?} is not a supported key type; expected RSA, EC, OKP or oct"))),
    }
}

fn significant_bits(bytes: &[u8]) -> usize {
    match bytes.iter().position(|b| *b != 0) {
        Some(i) => (bytes.len() - i) * 8 - bytes[i].leading_zeros() as usize,
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inline(json: &str) -> Result<KeySet, String> {
        let raw: RawJwks = serde_json::from_str(json).map_err(|e| e.to_string())?;
        compile_inline(&raw, "jwks", &mut HashSet::new()).map_err(|e| e.to_string())
    }

    fn b64(bytes: &[u8]) -> String {
        use ct_codecs::{Base64UrlSafeNoPadding, Encoder};
        Base64UrlSafeNoPadding::encode_to_string(bytes).unwrap()
    }

    fn algs(set: &KeySet) -> Vec<&'static str> {
        set.keys.iter().map(|k| k.algorithm().name()).collect()
    }

    #[test]
    fn a_key_without_alg_verifies_its_family_only() {
        let rsa = RS256KeyPair::generate(2048).unwrap().public_key().to_components();
        let json =
            format!(r#"{{"keys": [{{"kty": "RSA", "kid": "r", "n": "{}", "e": "{}"}}]}}"#, b64(&rsa.n), b64(&rsa.e));
        assert_eq!(algs(&inline(&json).unwrap()), ["RS256", "RS384", "RS512", "PS256"]);

        let json = format!(r#"{{"keys": [{{"kty": "oct", "k": "{}"}}]}}"#, b64(&[7; 48]));
        assert_eq!(algs(&inline(&json).unwrap()), ["HS256", "HS384"]);

        let json = format!(r#"{{"keys": [{{"kty": "oct", "alg": "HS512", "k": "{}"}}]}}"#, b64(&[7; 64]));
        assert_eq!(algs(&inline(&json).unwrap()), ["HS512"]);
    }

    #[test]
    fn invalid_keys_are_refused_with_their_path() {
        let p256 = ES256KeyPair::generate().public_key().public_key().to_bytes_uncompressed();
        let (x, y) = (b64(&p256[1..33]), b64(&p256[33..]));
        let cases = [
            (r#"{"keys": [{"kty": "RSA", "n": "!!", "e": "AQAB"}]}"#.to_owned(), "jwks.keys[0].n: not valid base64url"),
            (
                r#"{"keys": [{"kty": "RSA", "e": "AQAB"}]}"#.to_owned(),
                "jwks.keys[0].n: is required for a key of type \"RSA\"",
            ),
            (
                format!(r#"{{"keys": [{{"kty": "RSA", "n": "{}", "e": "AQAB"}}]}}"#, b64(&[0xff; 128])),
                "jwks.keys[0].n: an RSA modulus of 1024 bits; 2048 to 4096 bits are accepted",
            ),
            (
                r#"{"keys": [{"kty": "RSA", "alg": "HS256", "n": "AQAB", "e": "AQAB"}]}"#.to_owned(),
                "jwks.keys[0].alg: HS256 does not fit a key of type \"RSA\"",
            ),
            (
                r#"{"keys": [{"kty": "RSA", "alg": "RS999"}]}"#.to_owned(),
                "jwks.keys[0].alg: unknown algorithm \"RS999\"",
            ),
            (r#"{"keys": [{"kty": "RSA", "alg": "none"}]}"#.to_owned(), "jwks.keys[0].alg: unknown algorithm \"none\""),
            (r#"{"keys": [{"kty": "DSA"}]}"#.to_owned(), "jwks.keys[0].kty: \"DSA\" is not a supported key type"),
            (r#"{"keys": [{"kty": "RSA", "use": "enc"}]}"#.to_owned(), "jwks.keys[0].use: is \"enc\""),
            (
                format!(r#"{{"keys": [{{"kty": "EC", "crv": "P-256", "alg": "ES384", "x": "{x}", "y": "{y}"}}]}}"#),
                "jwks.keys[0].alg: ES384 does not fit",
            ),
            (
                format!(r#"{{"keys": [{{"kty": "EC", "crv": "P-384", "x": "{x}", "y": "{y}"}}]}}"#),
                "jwks.keys[0].x: must be 48 bytes for this curve, not 32",
            ),
            (
                format!(r#"{{"keys": [{{"kty": "EC", "crv": "P-256", "x": "{x}", "y": "{x}"}}]}}"#),
                "jwks.keys[0].x: not a point on the curve",
            ),
            (
                r#"{"keys": [{"kty": "EC", "crv": "secp256k1"}]}"#.to_owned(),
                "jwks.keys[0].crv: Some(\"secp256k1\") is not a supported curve",
            ),
            (
                r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AQAB"}]}"#.to_owned(),
                "jwks.keys[0].x: must be a 32-byte Ed25519 public key, not 3 bytes",
            ),
            (
                format!(r#"{{"keys": [{{"kty": "oct", "k": "{}"}}]}}"#, b64(&[1; 16])),
                "jwks.keys[0].k: an HMAC secret must be at least 32 bytes, this one has 16",
            ),
            (
                format!(r#"{{"keys": [{{"kty": "oct", "alg": "HS512", "k": "{}"}}]}}"#, b64(&[1; 32])),
                "jwks.keys[0].k: an HS512 secret must be at least 64 bytes, this one has 32",
            ),
            (
                format!(
                    r#"{{"keys": [{{"kty": "oct", "kid": "a", "k": "{k}"}}, {{"kty": "oct", "kid": "a", "k": "{k}"}}]}}"#,
                    k = b64(&[1; 32])
                ),
                "jwks.keys[1].kid: \"a\" is used by another key of this provider",
            ),
        ];
        for (json, expected) in cases {
            let message = inline(&json).unwrap_err();
            assert!(message.starts_with(expected), "{json}\n  gave: {message}\n  want: {expected}");
        }
    }

    #[test]
    fn a_fetched_jwks_skips_what_it_cannot_use() {
        let ed = Ed25519KeyPair::generate().public_key().to_bytes();
        let body = format!(
            r#"{{"keys": [
                {{"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "{}", "x5c": ["..."]}},
                {{"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"}},
                {{"kty": "AKP", "kid": "pq"}},
                {{"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "{}"}},
                {{"kty": "oct", "kid": "hs", "alg": "HS256", "k": "{}"}}
            ], "extra": true}}"#,
            b64(&ed),
            b64(&ed),
            b64(&[7; 32])
        );
        let load = parse_remote_jwks(body.as_bytes()).unwrap();
        assert_eq!(algs(&load.keys), ["EdDSA"]);
        let skipped: Vec<String> = load.skipped.iter().map(|e| e.path.clone()).collect();
        // An HMAC key from a URL would let whoever answers it sign tokens.
        assert_eq!(skipped, ["keys[1].use", "keys[2].kty", "keys[3].kid", "keys[4].kty"]);

        let err = parse_remote_jwks(br#"{"keys": [{"kty": "AKP"}]}"#).unwrap_err();
        assert_eq!(err.to_string(), "keys: no usable signing key");
        let err = parse_remote_jwks(b"<html>").unwrap_err();
        assert!(err.to_string().starts_with("$: not a JWKS document: expected value"), "{err}");
        let err = parse_remote_jwks(br#"{"keys": {}}"#).unwrap_err();
        assert!(err.to_string().starts_with("keys: not a JWKS document: invalid type"), "{err}");
        let err = parse_remote_jwks(br#"{"keys": [{"kty": "RSA", "n": 5}]}"#).unwrap_err();
        assert!(err.to_string().starts_with("keys[0].n: not a JWKS document: invalid type"), "{err}");
    }

    #[test]
    fn candidates_match_kid_or_keys_without_one() {
        let secret = b64(&[9; 32]);
        let json = format!(
            r#"{{"keys": [{{"kty": "oct", "kid": "a", "k": "{secret}", "alg": "HS256"}},
                          {{"kty": "oct", "kid": "b", "k": "{secret}", "alg": "HS256"}},
                          {{"kty": "oct", "k": "{secret}", "alg": "HS256"}}]}}"#
        );
        let set = inline(&json).unwrap();
        let kids = |kid| set.candidates(kid).map(|k| k.kid.as_deref().unwrap_or("-")).collect::<Vec<_>>();
        assert_eq!(kids(Some("a")), ["a", "-"]);
        assert_eq!(kids(Some("zz")), ["-"]);
        assert_eq!(kids(None), ["a", "b", "-"]);
        assert_eq!(format!("{:?}", set.keys[0]), r#"Key { kid: Some("a"), alg: "HS256" }"#);
    }

    #[test]
    fn algorithm_names_round_trip_and_none_is_unknown() {
        for name in ALGORITHM_NAMES.split(", ") {
            assert_eq!(Algorithm::from_name(name).map(Algorithm::name), Some(name));
        }
        assert_eq!(Algorithm::from_name("none"), None);
        assert_eq!(Algorithm::from_name("hs256"), None);
    }
}
