//! `ws::stream::isoformat_utc` on any i64, against an independent civil-calendar formatter; and the calendar
//! arithmetic the frame target's timestamp model uses.

use webmacs_core::ws::stream::isoformat_utc;

use crate::harness::{signature, Rng, Target};

/// Days from 1970-01-01 to the proleptic Gregorian date (H. Hinnant's `days_from_civil`).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number (inverse of `days_from_civil`).
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

pub fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z in µs: Python's datetime range.
pub const PY_MIN_US: i64 = -62_135_596_800_000_000;
pub const PY_MAX_US: i64 = 253_402_300_799_999_999;

/// Python's `datetime.isoformat()` of an aware UTC time, written without chrono.
fn python_isoformat(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    let frac = if micros == 0 {
        String::new()
    } else {
        format!(".{micros:06}")
    };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{frac}+00:00",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

pub struct Isoformat;

impl Target for Isoformat {
    type Input = i64;

    fn new(_: &mut Rng) -> Self {
        Isoformat
    }

    fn generate(&mut self, rng: &mut Rng) -> i64 {
        let edges = [
            0,
            -1,
            1,
            999_999,
            1_000_000,
            PY_MIN_US,
            PY_MIN_US - 1,
            PY_MAX_US,
            PY_MAX_US + 1,
            i64::MIN,
            i64::MAX,
            // chrono's own range ends near ±262,143 years.
            8_210_266_876_799_999_999,
            8_210_266_876_800_000_000,
            -8_334_601_228_800_000_000,
            -8_334_601_228_800_000_001,
        ];
        match rng.below(5) {
            0 => rng.u64() as i64,
            1 => rng
                .pick(&edges)
                .saturating_add(rng.range(-2_000_000, 2_000_000)),
            2 => rng.range(0, 4_102_444_800_000_000),
            3 => rng.range(PY_MIN_US, PY_MAX_US),
            _ => rng.pick(&edges),
        }
    }

    fn check(&mut self, &us: &i64) -> Result<u64, String> {
        let s = isoformat_utc(us);
        let in_range = (PY_MIN_US..=PY_MAX_US).contains(&us);
        if in_range {
            let want = python_isoformat(us);
            if s != want {
                return Err(format!("isoformat_utc({us}) = {s:?}, Python says {want:?}"));
            }
        } else if !s.ends_with("+00:00") {
            return Err(format!("isoformat_utc({us}) = {s:?} is not a UTC time"));
        }
        Ok(signature(&(in_range, us % 1_000_000 == 0, s.len())))
    }

    fn artifact(input: &i64) -> Vec<u8> {
        input.to_string().into_bytes()
    }
}

#[test]
fn calendar_round_trip() {
    for z in [-800_000, -719_468, -1, 0, 1, 11_016, 2_932_896] {
        let (y, m, d) = civil_from_days(z);
        assert_eq!(days_from_civil(y, m, d), z);
    }
    assert_eq!(civil_from_days(0), (1970, 1, 1));
    assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    assert_eq!(python_isoformat(PY_MIN_US), "0001-01-01T00:00:00+00:00");
    assert_eq!(
        python_isoformat(PY_MAX_US),
        "9999-12-31T23:59:59.999999+00:00"
    );
}
