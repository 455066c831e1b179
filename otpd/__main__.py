from otpd.cli import main

raise SystemExit(main())
