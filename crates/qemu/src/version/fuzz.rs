//! Property tests of the `--version` banner parser (issue 11, "inputs fuzzed").

use super::*;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_output_parses_or_is_refused_without_a_panic(text in "\\PC{0,80}|QEMU emulator version [ -~]{0,30}") {
        if let Some(v) = parse(&text) {
            prop_assert!(text.contains(&format!("version {}", v.major)), "{:?} from {:?}", v, text);
            prop_assert_eq!(v.banner.as_str(), text.lines().next().unwrap_or("").trim());
        }
    }

    #[test]
    fn a_generated_banner_reads_back(major in any::<u32>(), minor in proptest::option::of(any::<u32>()), micro in proptest::option::of(any::<u32>()),
                                     suffix in "( \\([ -~]{0,30}\\))?", rest in "(\n[ -~]{0,40}){0,3}") {
        let num = match (minor, micro) {
            (Some(m), Some(u)) => format!("{major}.{m}.{u}"),
            (Some(m), None) => format!("{major}.{m}"),
            (None, _) => format!("{major}"),
        };
        let v = parse(&format!("QEMU emulator version {num}{suffix}{rest}"));
        let v = v.map(|v| (v.major, v.minor, v.micro));
        prop_assert_eq!(v, Some((major, minor.unwrap_or(0), if minor.is_some() { micro.unwrap_or(0) } else { 0 })));
    }
}
