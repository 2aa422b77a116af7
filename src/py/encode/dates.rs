//! `datetime`, `date`, `time`, `timedelta` and their time zones.
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{
    PyDate, PyDateAccess, PyDateTime, PyDelta, PyDeltaAccess, PyTime, PyTimeAccess, PyTuple,
    PyTzInfoAccess,
};

use super::{type_name, Encoder, Failure, Step};
use crate::header::Tag;

impl<'py> Encoder<'py> {
    pub(super) fn datetime(&mut self, value: &Bound<'py, PyAny>) -> Result<Option<()>, Failure> {
        if let Ok(stamp) = value.cast_exact::<PyDateTime>() {
            self.out.tag(Tag::Datetime);
            self.out.ivarint(i64::from(stamp.get_year()));
            self.out.raw(&[
                stamp.get_month(),
                stamp.get_day(),
                stamp.get_hour(),
                stamp.get_minute(),
                stamp.get_second(),
            ]);
            self.out.uvarint(u64::from(stamp.get_microsecond()));
            self.out.u8(u8::from(stamp.get_fold()));
            self.tzinfo(stamp.get_tzinfo(), value)?;
        } else if let Ok(date) = value.cast_exact::<PyDate>() {
            self.out.tag(Tag::Date);
            self.out.ivarint(i64::from(date.get_year()));
            self.out.u8(date.get_month());
            self.out.u8(date.get_day());
        } else if let Ok(time) = value.cast_exact::<PyTime>() {
            self.out.tag(Tag::Time);
            self.out
                .raw(&[time.get_hour(), time.get_minute(), time.get_second()]);
            self.out.uvarint(u64::from(time.get_microsecond()));
            self.out.u8(u8::from(time.get_fold()));
            self.tzinfo(time.get_tzinfo(), value)?;
        } else if let Ok(delta) = value.cast_exact::<PyDelta>() {
            self.timedelta(delta);
        } else {
            return Ok(None);
        }
        Ok(Some(()))
    }

    pub(super) fn timedelta(&mut self, delta: &Bound<'py, PyDelta>) {
        self.out.tag(Tag::Timedelta);
        self.out.ivarint(i64::from(delta.get_days()));
        self.out.ivarint(i64::from(delta.get_seconds()));
        self.out.ivarint(i64::from(delta.get_microseconds()));
    }

    pub(super) fn tzinfo(
        &mut self,
        tz: Option<Bound<'py, pyo3::types::PyTzInfo>>,
        owner: &Bound<'py, PyAny>,
    ) -> Step {
        let py = self.py;
        let Some(tz) = tz else {
            self.out.tag(Tag::None);
            return Ok(());
        };
        let kind = tz.get_type();
        if kind.is(self.types.timezone.bind(py)) {
            let args = tz.call_method0(intern!(py, "__getinitargs__"))?;
            let args = args.cast::<PyTuple>().map_err(PyErr::from)?;
            self.out.tag(Tag::Timezone);
            let offset = args.get_item(0)?;
            self.timedelta(offset.cast::<PyDelta>().map_err(PyErr::from)?);
            match args.get_item(1) {
                Ok(name) => self.value(&name)?,
                Err(_) => self.out.tag(Tag::None),
            }
            return Ok(());
        }
        if self
            .types
            .zoneinfo
            .as_ref()
            .is_some_and(|zoneinfo| kind.is(zoneinfo.bind(py)))
        {
            let key = tz.getattr(intern!(py, "key"))?;
            if !key.is_none() {
                self.out.tag(Tag::ZoneInfo);
                self.out.str(&key.extract::<String>()?);
                return Ok(());
            }
        }
        Err(Failure::new(format!(
            "{} has a tzinfo of type {} that tensorslab cannot name",
            type_name(owner),
            type_name(tz.as_any())
        )))
    }
}
