"""Tests for otpd.broker."""
