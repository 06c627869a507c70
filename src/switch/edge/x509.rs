//! What the edge shows about a certificate and when it renews one: its expiry and its
//! issuer's name, read from the DER of an X.509 certificate (RFC 5280 §4.1). Pure, and
//! reads nothing else: the TLS library checks the rest.

use chrono::NaiveDateTime;

/// A certificate as the edge reports it.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    /// `notAfter`, Unix seconds.
    pub not_after: i64,
    /// The issuer's common name (else its organization).
    pub issuer: Option<String>,
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
const OID_ORGANIZATION: &[u8] = &[0x55, 0x04, 0x0a];

/// The summary of one DER certificate; `None` if it is not one.
pub fn summary(der: &[u8]) -> Option<Summary> {
    let (tag, certificate, _) = tlv(der)?;
    (tag == SEQUENCE).then_some(())?;
    let (tag, tbs, _) = tlv(certificate)?;
    (tag == SEQUENCE).then_some(())?;
    let mut rest = tbs;
    let mut next = || {
        let (tag, value, after) = tlv(rest)?;
        rest = after;
        Some((tag, value))
    };
    let (mut tag, _) = next()?;
    if tag == 0xa0 {
        // The explicit version; the serial number follows.
        (tag, _) = next()?;
    }
    (tag == 0x02).then_some(())?;
    let _signature = next()?;
    let (tag, issuer) = next()?;
    (tag == SEQUENCE).then_some(())?;
    let (tag, validity) = next()?;
    (tag == SEQUENCE).then_some(())?;
    let (_, _, after_not_before) = tlv(validity)?;
    let (tag, not_after, _) = tlv(after_not_before)?;
    Some(Summary {
        not_after: time(tag, not_after)?,
        issuer: name_attribute(issuer, OID_COMMON_NAME)
            .or_else(|| name_attribute(issuer, OID_ORGANIZATION)),
    })
}

/// One tag-length-value: the tag, the value, and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let bytes = usize::from(first & 0x7f);
        (bytes > 0 && bytes <= 4 && rest.len() >= bytes).then_some(())?;
        let length = rest[..bytes]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (length, &rest[bytes..])
    };
    (rest.len() >= length).then_some(())?;
    Some((tag, &rest[..length], &rest[length..]))
}

/// The first value of attribute `oid` in a distinguished name.
fn name_attribute(mut name: &[u8], oid: &[u8]) -> Option<String> {
    while !name.is_empty() {
        let (tag, set, after) = tlv(name)?;
        name = after;
        if tag != SET {
            continue;
        }
        let (_, pair, _) = tlv(set)?;
        let (tag, id, value) = tlv(pair)?;
        if tag == OID && id == oid {
            let (_, text, _) = tlv(value)?;
            return Some(String::from_utf8_lossy(text).into_owned());
        }
    }
    None
}

fn time(tag: u8, value: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(value).ok()?;
    let parsed = match tag {
        UTC_TIME => NaiveDateTime::parse_from_str(text, "%y%m%d%H%M%SZ").ok()?,
        GENERALIZED_TIME => NaiveDateTime::parse_from_str(text, "%Y%m%d%H%M%SZ").ok()?,
        _ => return None,
    };
    Some(parsed.and_utc().timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_and_issuer_are_read_from_a_real_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["hello.test".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Edge Test CA");
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();

        let summary = summary(cert.der()).unwrap();

        assert_eq!(summary.issuer.as_deref(), Some("Edge Test CA"));
        let expected = chrono::NaiveDate::from_ymd_opt(2031, 5, 17)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp();
        assert_eq!(summary.not_after, expected);
    }

    #[test]
    fn what_is_not_a_certificate_has_no_summary() {
        for bad in [
            &b""[..],
            b"\x30",
            b"\x30\x82\xff\xff",
            b"\x02\x01\x00",
            b"garbage",
        ] {
            assert_eq!(summary(bad), None, "{bad:?}");
        }
    }
}
