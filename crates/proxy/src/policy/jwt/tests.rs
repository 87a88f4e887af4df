//! Tests of JWT request authentication: every supported algorithm, every refusal, token
//! locations, effects, scoping, and JWKS fetched from a loopback server.

use super::*;
use http_body_util::Full;
use jsonwebtoken::{EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{self as sig, KeyPair};
use serde_json::json;
use std::sync::Mutex;
use trellis_api::resources::request_authentication::{
    ClaimToHeader, JwtHeader, RequestAuthenticationSpec,
};
use trellis_api::resources::{ObjectMeta, WorkloadSelector};

/// A fixed 2048-bit RSA test key (`openssl genrsa -traditional 2048`, made once at dev time).
const RSA_PEM: &str = "\
-----BEGIN RSA PRIVATE KEY-----\n\
MIIEogIBAAKCAQEAxQY2hoF0UarYO+naNlombIuNHWhSQD02v23ExKSiWVbxgA9y\n\
JXCzDibwckJ7ZHPjnXWbXdVhHV459P5N+jqv8j6mxZqjdOb/VOxgI+WvQ+PcmfIY\n\
2Hot7tLsLZAslxfO01Waiu+YfAoqHDtUXtZi+Q1B0y8zL8L18Bhh4gSn/zx1ssMr\n\
2iZgk254gkKGq+55F2cKQNdcXBCi1yE8SKthiOX71v9OAxYP/ZkC+CvOVQctIn5M\n\
U9PfHtnovyqhxa+RfP8oSVTKnpJ2rXW6qiUGLV5Eox/AADCaaAE8KAycvrHj0Xqt\n\
6i1OEeLmLqlSP5HBx7EuJbAqowgS/WZCFzaD/wIDAQABAoIBAB0it5J5d1WSYaqu\n\
gN3zw+XeVy5nnG4yfzOczHHV9MooYMsyvYsK2Pe5S2piKXQn7Rt+Zkzgfp2EryZr\n\
KuXbouQ8XpYvMYfalxycXfVBBIOSIS/EzObKXpuIJnPwc5+eXjADYziziMWjDSoi\n\
ne3uXzF8Q+UygCvKdWsdd/AgByXnrQMEounqH9BgbYd62xT/pP1c13NyMikB5uuu\n\
hxsz+A34kviGj1BukqkDsJlis+GddxO/rS882jcQrKu+y/9a1AFT3TeJSXDdU6TL\n\
RFkfo8x52NAMx1MOfTobv3Q84j2yZyOv0aZipJTF0vBxoVpj3GuumYb9VTTK8HKO\n\
SWtNUrUCgYEA5Jrp/XMr5IWUE833IMuCJgPwcH/CvWFSsGWweB89Bxf5jP0yfvg7\n\
fc+FQ8NCdVwMzvqNnPickx+5aWogkuoOhFKywlN/z5MbwAMZ887/dFn4M+/Dk2U/\n\
n4veVk0vyNelBDV8ueQZKOi9PKnanlU/sfmygvHPAQ3//L07x5kE+2sCgYEA3KJ4\n\
R64Suji31Pu10mtYqK/AYeENSb8VELZfHQ4aVXoIhtv6e/6B/9ozWW2XBLogt5dZ\n\
/V//Agl8CDCdLr/6MTRJZiXXR4MM1EX791fuWfEmtvVvPGR6je98Y9CUCsOfxWPj\n\
SqwkNNBUW64ht4v8vyHmtHVuiwKcJjf1OgnKMr0CgYAXE+x7QZ00vKduOGSyUtkY\n\
rV0gfkVSiPioBhwChGTMyobOzODEIJsg4Eo7xQJ4hopkerbBGff0gkdddPFE44wD\n\
n7WcGIHWmqs6fxWnn0X6oPqFg7bisl3x5VTUsYYZaGuoOR4WRgikMJqp/Rus0D5V\n\
4Tc8MN0M5jTpdtEKHVB7cQKBgCSpcqcmi8IZ7qIbeWkPoVnWandZOCYK9GskgsWH\n\
NGUDtCsEnqi/78Yd8e5oQXHto8YeBjwOGYezH8MUoOnFyMMoVxH8M7uUUStsvaOq\n\
HtcfNTmtquA0KhEvvFGxtQfc3c2k/X3JAPMtsvbRBpVDU6pG7dkKsmWy91N6dOtB\n\
+TFZAoGAV7O6Egy39m+8ho1q9LtSn2Iw3iAdAecn7CS514oizJ9mJ20Dd/vci1+8\n\
IavJWDcYn4EvMZswrGTlwsCQ9zzL/8+mTNcNARQZbu2GGBCrr4YqFWMiI7iqfHlc\n\
rx3/MNnTwlEGmEfRiRnb+tgFj/Oqt5FhkS5OGGO0s8P1zGkLBvA=\n\
-----END RSA PRIVATE KEY-----\n";

const ISS: &str = "https://issuer.example";
const ROOT: &str = "trellis-system";

/// A signing key and its public JWK.
struct Signer {
    alg: Algorithm,
    kid: Option<String>,
    key: EncodingKey,
    jwk: Value,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn rsa_der() -> Vec<u8> {
    let body: String = RSA_PEM
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

fn rsa(alg: Algorithm, kid: &str) -> Signer {
    let der = rsa_der();
    let pair = sig::RsaKeyPair::from_der(&der).unwrap();
    let public = sig::RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
    Signer {
        alg,
        kid: Some(kid.into()),
        key: EncodingKey::from_rsa_der(&der),
        jwk: json!({"kty": "RSA", "kid": kid, "n": b64(&public.n), "e": b64(&public.e)}),
    }
}

fn ec(alg: Algorithm, kid: &str) -> Signer {
    let (signing, crv, len) = match alg {
        Algorithm::ES256 => (&sig::ECDSA_P256_SHA256_FIXED_SIGNING, "P-256", 32),
        _ => (&sig::ECDSA_P384_SHA384_FIXED_SIGNING, "P-384", 48),
    };
    let rng = SystemRandom::new();
    let doc = sig::EcdsaKeyPair::generate_pkcs8(signing, &rng).unwrap();
    let pair = sig::EcdsaKeyPair::from_pkcs8(signing, doc.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref();
    Signer {
        alg,
        kid: Some(kid.into()),
        key: EncodingKey::from_ec_der(doc.as_ref()),
        jwk: json!({"kty": "EC", "crv": crv, "kid": kid,
                    "x": b64(&point[1..1 + len]), "y": b64(&point[1 + len..])}),
    }
}

fn ed(kid: &str) -> Signer {
    let doc = sig::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    let pair = sig::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
    Signer {
        alg: Algorithm::EdDSA,
        kid: Some(kid.into()),
        key: EncodingKey::from_ed_der(doc.as_ref()),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid,
                    "x": b64(pair.public_key().as_ref())}),
    }
}

impl Signer {
    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = self.kid.clone();
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }

    fn without_kid(mut self) -> Self {
        self.kid = None;
        self
    }
}

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

fn claims() -> Value {
    json!({"iss": ISS, "sub": "alice", "aud": "api", "exp": now() + 3600, "iat": now()})
}

fn jwks(keys: &[&Signer]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

fn rule(keys: &[&Signer]) -> JwtRule {
    JwtRule {
        issuer: ISS.into(),
        jwks: Some(jwks(keys)),
        ..JwtRule::default()
    }
}

fn policy(
    ns: &str,
    name: &str,
    labels: &[(&str, &str)],
    rules: Vec<JwtRule>,
) -> RequestAuthentication {
    let mut metadata = ObjectMeta::default();
    metadata.name = name.into();
    metadata.namespace = Some(ns.into());
    RequestAuthentication {
        api_version: "security.istio.io/v1".into(),
        kind: "RequestAuthentication".into(),
        metadata,
        spec: RequestAuthenticationSpec {
            selector: (!labels.is_empty()).then(|| WorkloadSelector {
                match_labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            }),
            jwt_rules: rules,
            ..RequestAuthenticationSpec::default()
        },
        status: None,
    }
}

fn compile(rules: Vec<JwtRule>) -> JwtAuthn {
    let cache = JwksCache::new(None);
    JwtAuthn::compile(
        &[policy("default", "jwt", &[], rules)],
        "default",
        &BTreeMap::new(),
        ROOT,
        &cache,
    )
    .unwrap()
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        map.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    map
}

fn bearer(token: &str) -> HeaderMap {
    headers(&[("authorization", &format!("Bearer {token}"))])
}

fn valid(outcome: Authn) -> (JwtAttrs, JwtEffects) {
    match outcome {
        Authn::Valid(attrs, effects) => (attrs, effects),
        other => panic!("want Valid, got {other:?}"),
    }
}

fn invalid(outcome: Authn) -> JwtError {
    match outcome {
        Authn::Invalid(e) => e,
        other => panic!("want Invalid, got {other:?}"),
    }
}

#[test]
fn every_supported_algorithm_verifies() {
    use Algorithm::*;
    let signers = [
        rsa(RS256, "rs256"),
        rsa(RS384, "rs384"),
        rsa(RS512, "rs512"),
        rsa(PS256, "ps256"),
        rsa(PS384, "ps384"),
        rsa(PS512, "ps512"),
        ec(ES256, "es256"),
        ec(ES384, "es384"),
        ed("eddsa"),
    ];
    let authn = compile(vec![rule(&signers.iter().collect::<Vec<_>>())]);
    for signer in &signers {
        let (attrs, _) = valid(authn.authenticate(&bearer(&signer.sign(&claims())), None));
        assert_eq!(attrs.principal, format!("{ISS}/alice"), "{:?}", signer.alg);
        assert_eq!(attrs.audiences, vec!["api".to_string()]);
        assert_eq!(attrs.claims["sub"], "alice");
    }
}

#[test]
fn alg_none_and_hmac_are_refused() {
    let key = rsa(Algorithm::RS256, "k1");
    let authn = compile(vec![rule(&[&key])]);
    let payload = b64(claims().to_string().as_bytes());
    for header in [json!({"alg": "none"}), json!({"alg": "none", "kid": "k1"})] {
        let unsigned = format!("{}.{payload}.", b64(header.to_string().as_bytes()));
        assert_eq!(
            invalid(authn.authenticate(&bearer(&unsigned), None)),
            JwtError::Algorithm
        );
    }
    // The classic key-confusion attack: HS256 keyed with the RSA public key's bytes.
    let pair = sig::RsaKeyPair::from_der(&rsa_der()).unwrap();
    let public = sig::RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
    let secrets = [
        pair.public().as_ref().to_vec(),
        public.n.clone(),
        jwks(&[&key]).into_bytes(),
    ];
    for secret in secrets {
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let hmac = Signer {
                alg,
                kid: Some("k1".into()),
                key: EncodingKey::from_secret(&secret),
                jwk: Value::Null,
            };
            let token = hmac.sign(&claims());
            assert_eq!(
                invalid(authn.authenticate(&bearer(&token), None)),
                JwtError::Algorithm
            );
        }
    }
}

#[test]
fn hmac_keys_in_a_jwks_are_never_used() {
    let secret = json!({"kty": "oct", "kid": "h", "k": b64(b"secret")});
    let only_hmac = json!({"keys": [secret]}).to_string();
    let cache = JwksCache::new(None);
    let mut r = rule(&[]);
    r.jwks = Some(only_hmac);
    let err = JwtAuthn::compile(
        &[policy("default", "p", &[], vec![r])],
        "default",
        &BTreeMap::new(),
        ROOT,
        &cache,
    )
    .err()
    .unwrap();
    assert!(
        err.contains("spec.jwtRules[0].jwks: no usable key"),
        "{err}"
    );
}

#[test]
fn algorithm_must_fit_the_key() {
    let rsa_key = rsa(Algorithm::RS256, "shared");
    let ec_key = ec(Algorithm::ES256, "shared");
    // An ES256 token naming an RSA key's kid: no key fits.
    let authn = compile(vec![rule(&[&rsa_key])]);
    let token = ec_key.sign(&claims());
    assert_eq!(
        invalid(authn.authenticate(&bearer(&token), None)),
        JwtError::UnknownKey
    );
    // A P-384 key cannot verify ES256, nor a P-256 key ES384.
    let p384 = ec(Algorithm::ES384, "p384");
    let confused = ec(Algorithm::ES256, "p384");
    let authn = compile(vec![rule(&[&p384])]);
    assert_eq!(
        invalid(authn.authenticate(&bearer(&confused.sign(&claims())), None)),
        JwtError::UnknownKey
    );
    // A JWK whose alg is RS256 does not verify PS256, though both are RSA.
    let mut pinned = rsa(Algorithm::RS256, "pinned");
    pinned.jwk["alg"] = json!("RS256");
    let authn = compile(vec![rule(&[&pinned])]);
    let ps = rsa(Algorithm::PS256, "pinned");
    assert_eq!(
        invalid(authn.authenticate(&bearer(&ps.sign(&claims())), None)),
        JwtError::UnknownKey
    );
    valid(authn.authenticate(&bearer(&pinned.sign(&claims())), None));
}

#[test]
fn expiry_and_not_before_allow_one_minute_of_skew() {
    let key = ec(Algorithm::ES256, "k");
    let authn = compile(vec![rule(&[&key])]);
    let check = |patch: Value| {
        let mut c = claims();
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        authn.authenticate(&bearer(&key.sign(&c)), None)
    };
    assert_eq!(
        invalid(check(json!({"exp": now() - 120}))),
        JwtError::Expired
    );
    valid(check(json!({"exp": now() - 30})));
    assert_eq!(
        invalid(check(json!({"nbf": now() + 120}))),
        JwtError::NotYetValid
    );
    valid(check(json!({"nbf": now() + 30})));
    assert_eq!(
        invalid(check(json!({"exp": "tomorrow"}))),
        JwtError::Malformed
    );
    // No exp at all is accepted (Istio does not require it).
    let mut forever = claims();
    forever.as_object_mut().unwrap().remove("exp");
    valid(authn.authenticate(&bearer(&key.sign(&forever)), None));
}

#[test]
fn issuer_must_be_configured() {
    let key = ed("k");
    let authn = compile(vec![rule(&[&key])]);
    let mut other = claims();
    other["iss"] = json!("https://elsewhere.example");
    assert_eq!(
        invalid(authn.authenticate(&bearer(&key.sign(&other)), None)),
        JwtError::UnknownIssuer
    );
    other.as_object_mut().unwrap().remove("iss");
    assert_eq!(
        invalid(authn.authenticate(&bearer(&key.sign(&other)), None)),
        JwtError::UnknownIssuer
    );
}

#[test]
fn issuer_picks_its_own_keys() {
    let a = ec(Algorithm::ES256, "a");
    let b = ec(Algorithm::ES256, "b");
    let mut rule_b = rule(&[&b]);
    rule_b.issuer = "issuer-b".into();
    let authn = compile(vec![rule(&[&a]), rule_b]);
    valid(authn.authenticate(&bearer(&a.sign(&claims())), None));
    let mut from_b = claims();
    from_b["iss"] = json!("issuer-b");
    let (attrs, _) = valid(authn.authenticate(&bearer(&b.sign(&from_b)), None));
    assert_eq!(attrs.principal, "issuer-b/alice");
    // Signed by b's key but claiming a's issuer: a's JWKS has no such key.
    assert_eq!(
        invalid(authn.authenticate(&bearer(&b.sign(&claims())), None)),
        JwtError::UnknownKey
    );
    let anonymous_b = ec(Algorithm::ES256, "b").without_kid();
    assert_eq!(
        invalid(authn.authenticate(&bearer(&anonymous_b.sign(&claims())), None)),
        JwtError::Signature
    );
}

#[test]
fn audiences_when_configured() {
    let key = rsa(Algorithm::RS256, "k");
    let mut r = rule(&[&key]);
    r.audiences = vec!["api".into(), "web".into()];
    let authn = compile(vec![r]);
    let with_aud = |aud: Option<Value>| {
        let mut c = claims();
        match aud {
            Some(a) => c["aud"] = a,
            None => {
                c.as_object_mut().unwrap().remove("aud");
            }
        }
        authn.authenticate(&bearer(&key.sign(&c)), None)
    };
    valid(with_aud(Some(json!("web"))));
    let (attrs, _) = valid(with_aud(Some(json!(["other", "api"]))));
    assert_eq!(
        attrs.audiences,
        vec!["other".to_string(), "api".to_string()]
    );
    assert_eq!(invalid(with_aud(Some(json!("other")))), JwtError::Audience);
    assert_eq!(invalid(with_aud(Some(json!([])))), JwtError::Audience);
    assert_eq!(invalid(with_aud(None)), JwtError::Audience);
    // Without audiences any aud (or none) passes.
    let open = compile(vec![rule(&[&key])]);
    let mut c = claims();
    c["aud"] = json!("anything");
    valid(open.authenticate(&bearer(&key.sign(&c)), None));
}

#[test]
fn tampering_and_malformed_tokens_fail() {
    let key = rsa(Algorithm::PS256, "k");
    let authn = compile(vec![rule(&[&key])]);
    let token = key.sign(&claims());
    let (input, signature) = token.rsplit_once('.').unwrap();
    let mut flipped = signature.as_bytes().to_vec();
    flipped[10] = if flipped[10] == b'A' { b'B' } else { b'A' };
    let bad_sig = format!("{input}.{}", String::from_utf8(flipped).unwrap());
    assert_eq!(
        invalid(authn.authenticate(&bearer(&bad_sig), None)),
        JwtError::Signature
    );
    let (header, _) = input.split_once('.').unwrap();
    let mut admin = claims();
    admin["sub"] = json!("admin");
    let forged = format!("{header}.{}.{signature}", b64(admin.to_string().as_bytes()));
    assert_eq!(
        invalid(authn.authenticate(&bearer(&forged), None)),
        JwtError::Signature
    );
    for junk in [
        "x",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        &format!("{input}.{signature}.x"),
        &format!("{input}=.{signature}"),
    ] {
        assert_eq!(
            invalid(authn.authenticate(&bearer(junk), None)),
            JwtError::Malformed,
            "{junk}"
        );
    }
    let crit = format!(
        "{}.{}.{signature}",
        b64(json!({"alg": "PS256", "kid": "k", "crit": ["exp"]})
            .to_string()
            .as_bytes()),
        input.split_once('.').unwrap().1
    );
    assert_eq!(
        invalid(authn.authenticate(&bearer(&crit), None)),
        JwtError::Algorithm
    );
}

#[test]
fn key_is_chosen_by_kid_or_tried_in_turn() {
    let k1 = ec(Algorithm::ES256, "k1");
    let k2 = ec(Algorithm::ES256, "k2");
    let authn = compile(vec![rule(&[&k1, &k2])]);
    let unknown = ec(Algorithm::ES256, "k3");
    assert_eq!(
        invalid(authn.authenticate(&bearer(&unknown.sign(&claims())), None)),
        JwtError::UnknownKey
    );
    let mut renamed = ec(Algorithm::ES256, "k2");
    renamed.key = k1.key.clone();
    // k1's signature presented as k2: only k2 is tried.
    assert_eq!(
        invalid(authn.authenticate(&bearer(&renamed.sign(&claims())), None)),
        JwtError::Signature
    );
    // Without a kid every ES256 key is tried.
    let mut anonymous = ec(Algorithm::ES256, "x").without_kid();
    anonymous.key = k2.key.clone();
    valid(authn.authenticate(&bearer(&anonymous.sign(&claims())), None));
}

#[test]
fn no_token_and_multiple_tokens() {
    let key = ed("k");
    let authn = compile(vec![rule(&[&key])]);
    assert!(matches!(
        authn.authenticate(&HeaderMap::new(), None),
        Authn::NoToken
    ));
    assert!(matches!(
        authn.authenticate(&headers(&[("authorization", "Basic dXNlcjpwdw==")]), None),
        Authn::NoToken
    ));
    assert!(matches!(
        authn.authenticate(&HeaderMap::new(), Some("a=1&b=2")),
        Authn::NoToken
    ));
    let token = key.sign(&claims());
    let auth = format!("Bearer {token}");
    let twice = headers(&[("authorization", &auth), ("authorization", &auth)]);
    assert_eq!(
        invalid(authn.authenticate(&twice, None)),
        JwtError::MultipleTokens
    );
    let query = format!("access_token={token}");
    assert_eq!(
        invalid(authn.authenticate(&bearer(&token), Some(&query))),
        JwtError::MultipleTokens
    );
    // The default locations: the bearer scheme in any case, and access_token.
    valid(authn.authenticate(
        &headers(&[("authorization", &format!("bearer {token}"))]),
        None,
    ));
    valid(authn.authenticate(&HeaderMap::new(), Some(&format!("x=1&{query}"))));
    // A rule-less workload never looks.
    let none = compile(Vec::new());
    assert!(none.is_empty());
    assert!(matches!(
        none.authenticate(&bearer("garbage"), None),
        Authn::NoToken
    ));
}

#[test]
fn configured_header_with_prefix_replaces_the_defaults() {
    let key = ec(Algorithm::ES384, "k");
    let mut r = rule(&[&key]);
    r.from_headers = vec![JwtHeader {
        name: "X-Jwt-Assertion".into(),
        prefix: Some("Token ".into()),
    }];
    let authn = compile(vec![r]);
    let token = key.sign(&claims());
    let (_, effects) = valid(authn.authenticate(
        &headers(&[("x-jwt-assertion", &format!("Token {token}"))]),
        None,
    ));
    let mut forwarded = headers(&[("x-jwt-assertion", "Token t"), ("authorization", "Basic x")]);
    apply(&effects, &mut forwarded);
    assert!(forwarded.get("x-jwt-assertion").is_none());
    assert!(forwarded.get("authorization").is_some());
    // Without the prefix the header holds no token; the default locations are not read.
    assert!(matches!(
        authn.authenticate(&headers(&[("x-jwt-assertion", &token)]), None),
        Authn::NoToken
    ));
    assert!(matches!(
        authn.authenticate(&bearer(&token), None),
        Authn::NoToken
    ));
    assert!(matches!(
        authn.authenticate(&HeaderMap::new(), Some(&format!("access_token={token}"))),
        Authn::NoToken
    ));
}

#[test]
fn configured_query_parameter() {
    let key = rsa(Algorithm::RS256, "k");
    let mut r = rule(&[&key]);
    r.from_params = vec!["my_token".into()];
    let authn = compile(vec![r]);
    let token = key.sign(&claims());
    let query = format!("a=1&my_token={token}&b=2");
    let (_, effects) = valid(authn.authenticate(&HeaderMap::new(), Some(&query)));
    assert_eq!(effects.rewrite_query(&query).as_deref(), Some("a=1&b=2"));
    assert!(matches!(
        authn.authenticate(&bearer(&token), None),
        Authn::NoToken
    ));
    let bad = "my_token=not.a.jwt";
    assert_eq!(
        invalid(authn.authenticate(&HeaderMap::new(), Some(bad))),
        JwtError::Malformed
    );
}

#[test]
fn configured_cookie() {
    let key = ed("k");
    let mut r = rule(&[&key]);
    r.from_cookies = vec!["session".into()];
    let authn = compile(vec![r]);
    let token = key.sign(&claims());
    let mut request = headers(&[
        ("cookie", &format!("theme=dark; session={token}")),
        ("cookie", "lang=en"),
    ]);
    let (_, effects) = valid(authn.authenticate(&request, None));
    apply(&effects, &mut request);
    assert_eq!(request.get("cookie").unwrap(), "theme=dark; lang=en");
}

#[test]
fn forward_original_token() {
    let key = ec(Algorithm::ES256, "k");
    let token = key.sign(&claims());
    let dropped = compile(vec![rule(&[&key])]);
    let mut request = bearer(&token);
    let (_, effects) = valid(dropped.authenticate(&request, None));
    apply(&effects, &mut request);
    assert!(
        request.get("authorization").is_none(),
        "Istio's default removes the token"
    );
    let query = format!("access_token={token}");
    let (_, effects) = valid(dropped.authenticate(&HeaderMap::new(), Some(&query)));
    assert_eq!(effects.rewrite_query(&query).as_deref(), Some(""));

    let mut r = rule(&[&key]);
    r.forward_original_token = true;
    let kept = compile(vec![r]);
    let mut request = bearer(&token);
    let (_, effects) = valid(kept.authenticate(&request, None));
    apply(&effects, &mut request);
    assert_eq!(
        request.get("authorization").unwrap(),
        &format!("Bearer {token}")
    );
    assert_eq!(effects.rewrite_query(&query), None);
}

#[test]
fn payload_and_claims_to_headers() {
    let key = rsa(Algorithm::RS256, "k");
    let mut r = rule(&[&key]);
    r.output_payload_to_header = Some("x-jwt-payload".into());
    r.output_claim_to_headers = ["sub", "org.team", "level", "admin", "missing", "groups"]
        .iter()
        .map(|c| ClaimToHeader {
            header: format!("x-claim-{}", c.replace('.', "-")),
            claim: c.to_string(),
        })
        .collect();
    let authn = compile(vec![r]);
    let mut c = claims();
    c["org"] = json!({"team": "payments"});
    c["level"] = json!(3);
    c["admin"] = json!(false);
    c["groups"] = json!(["a", "b"]);
    let token = key.sign(&c);
    let mut request = bearer(&token);
    request.insert("x-claim-missing", HeaderValue::from_static("forged"));
    request.insert("x-claim-sub", HeaderValue::from_static("mallory"));
    let (_, effects) = valid(authn.authenticate(&request, None));
    apply(&effects, &mut request);
    let payload = request.get("x-jwt-payload").unwrap().to_str().unwrap();
    assert_eq!(payload, token.split('.').nth(1).unwrap());
    let decoded: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    assert_eq!(decoded, c);
    assert_eq!(request.get("x-claim-sub").unwrap(), "alice");
    assert_eq!(request.get("x-claim-org-team").unwrap(), "payments");
    assert_eq!(request.get("x-claim-level").unwrap(), "3");
    assert_eq!(request.get("x-claim-admin").unwrap(), "false");
    assert!(
        request.get("x-claim-missing").is_none(),
        "a forged header is removed"
    );
    assert!(
        request.get("x-claim-groups").is_none(),
        "lists are not copied"
    );
    // Requests without a token lose forged output headers too.
    let mut anonymous = headers(&[
        ("x-jwt-payload", "forged"),
        ("x-claim-sub", "mallory"),
        ("x-other", "kept"),
    ]);
    authn.strip_output_headers(&mut anonymous);
    assert_eq!(anonymous.len(), 1);
}

#[test]
fn scoping_follows_istio() {
    let key = ed("k");
    let labels: BTreeMap<String, String> = [("app".to_string(), "api".to_string())].into();
    let policies = [
        policy(ROOT, "mesh", &[], vec![rule(&[&key])]),
        policy("default", "ns", &[], vec![rule(&[&key])]),
        policy(
            "default",
            "selected",
            &[("app", "api")],
            vec![rule(&[&key])],
        ),
        policy(
            "default",
            "other-app",
            &[("app", "web")],
            vec![rule(&[&key])],
        ),
        policy("other", "other-ns", &[], vec![rule(&[&key])]),
    ];
    let names: Vec<&str> = policies
        .iter()
        .filter(|p| applies_to(p, "default", &labels, ROOT))
        .map(|p| p.metadata.name.as_str())
        .collect();
    assert_eq!(names, ["mesh", "ns", "selected"]);
    let authn =
        JwtAuthn::compile(&policies, "default", &labels, ROOT, &JwksCache::new(None)).unwrap();
    assert_eq!(authn.rules.len(), 3);
}

#[test]
fn compile_errors_name_the_field() {
    let cache = JwksCache::new(None);
    let compile_one = |r: JwtRule| {
        JwtAuthn::compile(
            &[policy("default", "jwt", &[], vec![r])],
            "default",
            &BTreeMap::new(),
            ROOT,
            &cache,
        )
        .err()
        .unwrap_or_default()
    };
    let base = || JwtRule {
        issuer: ISS.into(),
        ..JwtRule::default()
    };
    let relative = compile_one(JwtRule {
        jwks_uri: Some("file://keys/jwks.json".into()),
        ..base()
    });
    assert!(
        relative.starts_with("RequestAuthentication/default/jwt: spec.jwtRules[0].jwksUri: ")
            && relative.contains("names no absolute path"),
        "{relative}"
    );
    let ftp = compile_one(JwtRule {
        jwks_uri: Some("ftp://issuer.example/jwks".into()),
        ..base()
    });
    assert!(
        ftp.contains("is not an http://, https:// or file:// URI"),
        "{ftp}"
    );
    // https is accepted (it then needs a runtime, like any jwksUri).
    let https = compile_one(JwtRule {
        jwks_uri: Some("https://issuer.example/jwks".into()),
        ..base()
    });
    assert!(https.contains("no async runtime"), "{https}");
    assert!(compile_one(base()).contains("neither jwks nor jwksUri"));
    let bad_json = compile_one(JwtRule {
        jwks: Some("{".into()),
        ..base()
    });
    assert!(
        bad_json.contains("spec.jwtRules[0].jwks: not JSON"),
        "{bad_json}"
    );
    let bad_header = compile_one(JwtRule {
        jwks: Some(r#"{"keys":[]}"#.into()),
        output_payload_to_header: Some("bad header".into()),
        ..base()
    });
    assert!(
        bad_header.contains("outputPayloadToHeader: \"bad header\" is not a valid header name"),
        "{bad_header}"
    );
    // A jwksUri needs a runtime to fetch on; outside one the error says so.
    let no_runtime = compile_one(JwtRule {
        jwks_uri: Some("http://127.0.0.1:1/jwks".into()),
        ..base()
    });
    assert!(no_runtime.contains("no async runtime"), "{no_runtime}");
}

#[test]
fn jwks_keys_of_unsupported_kinds_are_skipped() {
    let key = ed("k");
    let set = json!({"keys": [
        {"kty": "oct", "k": "c2VjcmV0"},
        {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"},
        {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"},
        {"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"},
        {"kty": "OKP", "crv": "X25519", "x": "AA"},
        {"kty": "RSA", "n": b64(&[0xff; 128]), "e": "AQAB"},
        key.jwk,
    ]});
    let mut r = rule(&[]);
    r.jwks = Some(set.to_string());
    let authn = compile(vec![r]);
    valid(authn.authenticate(&bearer(&key.sign(&claims())), None));
    // A set of nothing but unusable keys is refused, saying why.
    let weak = json!({"keys": [{"kty": "RSA", "n": b64(&[0xff; 128]), "e": "AQAB"}]});
    let err = KeySet::parse(&weak.to_string()).err().unwrap();
    assert!(
        err.contains("RSA modulus of 1024 bits (want 2048 to 4096)"),
        "{err}"
    );
}

// ---- JWKS over the network ------------------------------------------------------------------

/// A loopback HTTP server answering every request with the current JWKS, or, while
/// `mesh_error` is set, like a proxy's outbound listener that cannot route: 503 with that
/// `x-trellis-error`.
struct JwksServer {
    addr: std::net::SocketAddr,
    body: Arc<Mutex<String>>,
    mesh_error: Arc<Mutex<Option<&'static str>>>,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(body: String) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new(body));
        let mesh_error = Arc::new(Mutex::new(None));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (b, r, m) = (body.clone(), requests.clone(), mesh_error.clone());
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (body, requests, mesh_error) = (b.clone(), r.clone(), m.clone());
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let host = req
                            .headers()
                            .get("host")
                            .and_then(|h| h.to_str().ok())
                            .unwrap_or("");
                        requests
                            .lock()
                            .unwrap()
                            .push(format!("{host} {}", req.uri()));
                        let text = body.lock().unwrap().clone();
                        let mut response = http::Response::new(Full::new(bytes::Bytes::from(text)));
                        if let Some(error) = *mesh_error.lock().unwrap() {
                            *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                            response
                                .headers_mut()
                                .insert("x-trellis-error", HeaderValue::from_static(error));
                        }
                        async move { Ok::<_, std::convert::Infallible>(response) }
                    });
                connections.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        JwksServer {
            addr,
            body,
            mesh_error,
            requests,
            task,
        }
    }

    fn uri(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    /// Stops accepting and closes every connection.
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

fn remote_rule(uri: &str) -> JwtRule {
    JwtRule {
        issuer: ISS.into(),
        jwks_uri: Some(uri.into()),
        ..JwtRule::default()
    }
}

fn compile_with(cache: &JwksCache, rules: Vec<JwtRule>) -> JwtAuthn {
    JwtAuthn::compile(
        &[policy("default", "jwt", &[], rules)],
        "default",
        &BTreeMap::new(),
        ROOT,
        cache,
    )
    .unwrap()
}

/// Polls `check` every 20 ms until it holds, failing after 10 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn is_valid(outcome: Authn) -> bool {
    matches!(outcome, Authn::Valid(..))
}

#[tokio::test]
async fn fetched_keys_outlive_the_jwks_server() {
    let key = ec(Algorithm::ES256, "k1");
    let server = JwksServer::start(jwks(&[&key])).await;
    let uri = server.uri();
    let cache = JwksCache::with_settings(
        None,
        JwksSettings {
            refresh_interval: Duration::from_millis(100),
            min_refetch_interval: Duration::from_millis(100),
        },
    );
    let authn = compile_with(&cache, vec![remote_rule(&uri)]);
    let request = bearer(&key.sign(&claims()));
    eventually("the JWKS fetch", || {
        is_valid(authn.authenticate(&request, None))
    })
    .await;
    assert_eq!(cache.status(&uri).unwrap().keys, Some(1));
    assert!(server.requests.lock().unwrap()[0].ends_with(" /.well-known/jwks.json"));
    server.stop().await;
    eventually("a failed refresh", || {
        cache.status(&uri).unwrap().consecutive_failures >= 2
    })
    .await;
    let status = cache.status(&uri).unwrap();
    assert!(
        status.last_error.is_some() && status.keys == Some(1),
        "{status:?}"
    );
    valid(authn.authenticate(&request, None));
}

#[tokio::test]
async fn refresh_picks_up_a_rotated_key() {
    let old = ec(Algorithm::ES256, "old");
    let new = ed("new");
    let server = JwksServer::start(jwks(&[&old])).await;
    let cache = JwksCache::with_settings(
        None,
        JwksSettings {
            refresh_interval: Duration::from_millis(100),
            min_refetch_interval: Duration::from_millis(100),
        },
    );
    let authn = compile_with(&cache, vec![remote_rule(&server.uri())]);
    let old_token = bearer(&old.sign(&claims()));
    let new_token = bearer(&new.sign(&claims()));
    eventually("the first fetch", || {
        is_valid(authn.authenticate(&old_token, None))
    })
    .await;
    assert_eq!(
        invalid(authn.authenticate(&new_token, None)),
        JwtError::UnknownKey
    );
    *server.body.lock().unwrap() = jwks(&[&new]);
    eventually("the rotated key", || {
        is_valid(authn.authenticate(&new_token, None))
    })
    .await;
    assert_eq!(
        invalid(authn.authenticate(&old_token, None)),
        JwtError::UnknownKey
    );
    server.stop().await;
}

#[tokio::test]
async fn keys_not_yet_fetched_are_unavailable() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("http://{}/jwks", closed.local_addr().unwrap());
    drop(closed);
    let cache = JwksCache::with_settings(
        None,
        JwksSettings {
            refresh_interval: Duration::from_millis(50),
            min_refetch_interval: Duration::from_millis(50),
        },
    );
    let authn = compile_with(&cache, vec![remote_rule(&uri)]);
    let request = bearer(&ed("k").sign(&claims()));
    assert_eq!(
        invalid(authn.authenticate(&request, None)),
        JwtError::KeysUnavailable
    );
    eventually("failed fetches", || {
        cache.status(&uri).unwrap().consecutive_failures >= 2
    })
    .await;
    assert_eq!(
        invalid(authn.authenticate(&request, None)),
        JwtError::KeysUnavailable
    );
    assert!(cache
        .status(&uri)
        .unwrap()
        .last_error
        .unwrap()
        .starts_with("connect:"));
    // Dropping the last config using the URI ends its refresh task and forgets it.
    drop(authn);
    assert_eq!(cache.status(&uri), None);
}

#[tokio::test]
async fn fetch_goes_to_connect_to_in_absolute_form() {
    let key = rsa(Algorithm::RS256, "k");
    let server = JwksServer::start(jwks(&[&key])).await;
    let cache = JwksCache::new(Some(server.addr));
    let uri = "http://keys.auth.svc:8080/jwks?v=1";
    let authn = compile_with(&cache, vec![remote_rule(uri)]);
    let request = bearer(&key.sign(&claims()));
    eventually("the fetch via connect_to", || {
        is_valid(authn.authenticate(&request, None))
    })
    .await;
    assert_eq!(
        server.requests.lock().unwrap()[0],
        format!("keys.auth.svc:8080 {uri}")
    );
    // Configs share the cache's fetched keys.
    let again = compile_with(&cache, vec![remote_rule(uri)]);
    valid(again.authenticate(&request, None));
    server.stop().await;
}

/// An outbound listener standing in for the mesh, answering every request with `error`.
async fn mesh_answering(error: &'static str) -> JwksServer {
    let outbound = JwksServer::start(String::new()).await;
    *outbound.mesh_error.lock().unwrap() = Some(error);
    outbound
}

#[tokio::test]
async fn hosts_unknown_to_the_mesh_are_fetched_directly() {
    let key = ec(Algorithm::ES256, "k");
    let server = JwksServer::start(jwks(&[&key])).await;
    let outbound = mesh_answering("unknown-service").await;
    let cache = JwksCache::new(Some(outbound.addr));
    let authn = compile_with(&cache, vec![remote_rule(&server.uri())]);
    let request = bearer(&key.sign(&claims()));
    eventually("the direct fetch", || {
        is_valid(authn.authenticate(&request, None))
    })
    .await;
    // The mesh was asked first, then the host itself (origin form).
    assert_eq!(
        outbound.requests.lock().unwrap()[0],
        format!("{} {}", server.addr, server.uri())
    );
    assert_eq!(
        server.requests.lock().unwrap()[0],
        format!("{} /.well-known/jwks.json", server.addr)
    );
    outbound.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn other_mesh_errors_are_not_bypassed() {
    let key = ec(Algorithm::ES256, "k");
    let server = JwksServer::start(jwks(&[&key])).await;
    let outbound = mesh_answering("no-endpoints").await;
    let cache = JwksCache::new(Some(outbound.addr));
    let uri = server.uri();
    let authn = compile_with(&cache, vec![remote_rule(&uri)]);
    eventually("a failed fetch", || {
        cache.status(&uri).unwrap().consecutive_failures >= 1
    })
    .await;
    let status = cache.status(&uri).unwrap();
    assert_eq!(status.keys, None);
    assert_eq!(
        status.last_error.as_deref(),
        Some("status 503 Service Unavailable")
    );
    assert!(server.requests.lock().unwrap().is_empty());
    drop(authn);
    outbound.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn jwks_from_a_file() {
    let key = ec(Algorithm::ES384, "k");
    let path = std::env::temp_dir().join(format!(
        "trellis-jwks-{}-{}.json",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::write(&path, jwks(&[&key])).unwrap();
    let cache = JwksCache::new(None);
    let authn = compile_with(
        &cache,
        vec![remote_rule(&format!("file://{}", path.display()))],
    );
    let request = bearer(&key.sign(&claims()));
    eventually("the file read", || {
        is_valid(authn.authenticate(&request, None))
    })
    .await;
    let _ = std::fs::remove_file(path);
}

/// A JWKS file is read only up to the size limit: an endless one is refused, not read whole.
#[tokio::test]
async fn an_endless_jwks_file_is_refused_at_the_size_limit() {
    let fetcher = fetch::Fetcher::new(None);
    let source = fetch::JwksSource::parse("file:///dev/zero").unwrap();
    let read = tokio::time::timeout(Duration::from_secs(10), fetcher.fetch(&source)).await;
    let error = read.expect("read stops at the limit").unwrap_err();
    assert!(error.contains("larger than 1048576 bytes"), "{error}");
}

proptest::proptest! {
    #[test]
    fn arbitrary_tokens_never_panic(token in "[ -~]{0,200}", query in "[ -~]{0,100}") {
        let key = ed("k");
        let authn = compile(vec![rule(&[&key])]);
        let mut request = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
            request.insert(http::header::AUTHORIZATION, v);
        }
        let _ = authn.authenticate(&request, Some(&query));
        let dotted = format!("{}.{}.{}", b64(token.as_bytes()), b64(query.as_bytes()), b64(b"sig"));
        let outcome = authn.authenticate(&bearer(&dotted), None);
        proptest::prop_assert!(matches!(outcome, Authn::Invalid(_)));
    }
}
