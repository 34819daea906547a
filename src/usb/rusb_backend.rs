//! TODO: the rusb (libusb) implementation of `UsbBus` and `UsbTransport`.
