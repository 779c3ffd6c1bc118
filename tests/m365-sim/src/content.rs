//! Deterministic audit-record and content-id generation. A record is stored as a small descriptor and
//! rendered to its exact bytes on demand; the same descriptor always renders to the same bytes, and a
//! different `variant` renders the same fields in another order (different bytes, same `Id`).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use time::OffsetDateTime;

/// A generated audit record, rendered by [`render`].
#[derive(Clone, Debug)]
pub(crate) struct Record {
    /// The record `Id` (GUID).
    pub id: String,
    /// `CreationTime`.
    pub creation: OffsetDateTime,
    /// Seed of the field values.
    pub rseed: u64,
    /// 0: canonical field order; k ≥ 1: rotated by a k-dependent amount.
    pub variant: u32,
}

/// Formats `CreationTime` the way the API does: no zone suffix.
pub(crate) fn fmt_creation(t: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Formats `contentCreated`/`contentExpiration`: ISO with milliseconds and `Z`.
pub(crate) fn fmt_content_time(t: OffsetDateTime) -> String {
    format!("{}.{:03}Z", fmt_creation(t), t.millisecond())
}

/// A GUID string from an rng.
pub(crate) fn guid(rng: &mut StdRng) -> String {
    let b: u128 = rng.gen();
    let b =
        (b & !(0xF000u128 << 64) | (0x4000u128 << 64)) & !(0xC000u128 << 48) | (0x8000u128 << 48);
    let h = format!("{b:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A realistic, unique contentId: `<digits>$<digits>$audit_exchange$Audit_Exchange$emea0036`.
pub(crate) fn content_id(ct: &str, created: OffsetDateTime, seq: u64, tenant_id: &str) -> String {
    let digits = format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}{:09}",
        created.year(),
        u8::from(created.month()),
        created.day(),
        created.hour(),
        created.minute(),
        created.second(),
        seq
    );
    let lower = ct.replace('.', "_").to_ascii_lowercase();
    let upper = ct.replace('.', "_");
    let region = match tenant_id.as_bytes().first().map(|b| b % 3) {
        Some(0) => "emea0036",
        Some(1) => "na0030",
        _ => "apac0012",
    };
    format!("{digits}${digits}${lower}${upper}${region}")
}

fn js(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

const USERS: [&str; 8] = [
    "alex.wilber",
    "megan.bowen",
    "lee.gu",
    "nestor.wilke",
    "grady.archie",
    "isaiah.langer",
    "pradeep.gupta",
    "lynne.robbins",
];
const FILES: [&str; 6] = [
    "Q3 Budget.xlsx",
    "Roadmap 2027.pptx",
    "Contract - Fabrikam.docx",
    "Payroll export.csv",
    "Design notes.md",
    "Board minutes.pdf",
];

/// Renders a record of content type `ct` for `tenant_id` to its exact bytes (compact JSON object).
pub(crate) fn render(ct: &str, tenant_id: &str, r: &Record) -> String {
    let mut fields = fields(ct, tenant_id, r);
    let n = fields.len();
    if r.variant > 0 && n > 1 {
        let k = (r.variant as usize - 1) % (n - 1) + 1;
        fields.rotate_left(k);
    }
    let mut out = String::with_capacity(1600);
    out.push('{');
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        out.push_str(k);
        out.push_str("\":");
        out.push_str(v);
    }
    out.push('}');
    out
}

fn fields(ct: &str, tenant_id: &str, r: &Record) -> Vec<(&'static str, String)> {
    let mut rng = StdRng::seed_from_u64(r.rseed);
    let domain = format!(
        "contoso{}.onmicrosoft.com",
        tenant_id.get(..8).unwrap_or(tenant_id)
    );
    let user = format!("{}@{domain}", USERS[rng.gen_range(0..USERS.len())]);
    let ip = format!(
        "{}.{}.{}.{}",
        rng.gen_range(20..200),
        rng.gen_range(0..255),
        rng.gen_range(0..255),
        rng.gen_range(1..254)
    );
    let puid = format!("10032{:011X}", rng.gen::<u64>() & 0xFFF_FFFF_FFFF);
    let ct_time = js(&fmt_creation(r.creation));
    let mut f: Vec<(&'static str, String)> = vec![
        ("CreationTime", ct_time),
        ("Id", js(&r.id)),
        ("OrganizationId", js(tenant_id)),
    ];
    let ua = js("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.0.0 Safari/537.36 Edg/130.0.0.0");
    match ct {
        "Audit.AzureActiveDirectory" => {
            let ok = rng.gen_bool(0.9);
            f.extend([
                ("Operation", js("UserLoggedIn")),
                ("RecordType", "15".to_string()),
                ("ResultStatus", js(if ok { "Success" } else { "Failed" })),
                ("UserKey", js(&guid(&mut rng))),
                ("UserType", "0".to_string()),
                ("Version", "1".to_string()),
                ("Workload", js("AzureActiveDirectory")),
                ("ClientIP", js(&ip)),
                ("ObjectId", js("00000003-0000-0ff1-ce00-000000000000")),
                ("UserId", js(&user)),
                ("AzureActiveDirectoryEventType", "1".to_string()),
                ("ExtendedProperties", format!(
                    "[{{\"Name\":\"ResultStatusDetail\",\"Value\":{}}},{{\"Name\":\"UserAgent\",\"Value\":{ua}}},{{\"Name\":\"RequestType\",\"Value\":\"OAuth2:Authorize\"}}]",
                    js(if ok { "Redirect" } else { "UserError" }))),
                ("ModifiedProperties", "[]".to_string()),
                ("Actor", format!("[{{\"ID\":{},\"Type\":0}},{{\"ID\":{},\"Type\":5}}]", js(&guid(&mut rng)), js(&user))),
                ("ActorContextId", js(tenant_id)),
                ("ActorIpAddress", js(&ip)),
                ("InterSystemsId", js(&guid(&mut rng))),
                ("IntraSystemId", js(&guid(&mut rng))),
                ("SupportTicketId", js("")),
                ("Target", "[{\"ID\":\"00000003-0000-0ff1-ce00-000000000000\",\"Type\":0}]".to_string()),
                ("TargetContextId", js(tenant_id)),
                ("ApplicationId", js("89bee1f7-5e6e-4d8a-9f3d-ecd601259da7")),
                ("DeviceProperties", "[{\"Name\":\"OS\",\"Value\":\"Windows10\"},{\"Name\":\"BrowserType\",\"Value\":\"Edge\"},{\"Name\":\"IsCompliantAndManaged\",\"Value\":\"False\"},{\"Name\":\"SessionId\",\"Value\":\"0f1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d\"}]".to_string()),
                ("ErrorNumber", js(if ok { "0" } else { "50126" })),
            ]);
        }
        "Audit.Exchange" => {
            if rng.gen_bool(0.8) {
                f.extend([
                    ("Operation", js("MailItemsAccessed")),
                    ("RecordType", "2".to_string()),
                    ("ResultStatus", js("Succeeded")),
                    ("UserKey", js(&puid)),
                    ("UserType", "0".to_string()),
                    ("Version", "1".to_string()),
                    ("Workload", js("Exchange")),
                    ("ClientIP", js(&ip)),
                    ("UserId", js(&user)),
                    ("AppId", js("00000002-0000-0ff1-ce00-000000000000")),
                    ("ClientAppId", js("")),
                    ("ClientIPAddress", js(&ip)),
                    ("ClientInfoString", js("Client=OWA;Action=ViaProxy")),
                    ("ExternalAccess", "false".to_string()),
                    ("InternalLogonType", "0".to_string()),
                    ("LogonType", "0".to_string()),
                    ("LogonUserSid", js(&format!("S-1-5-21-{}-{}-{}-{}", rng.gen_range(1_000_000u32..9_999_999), rng.gen_range(1_000_000u32..9_999_999), rng.gen_range(1_000_000u32..9_999_999), rng.gen_range(1000..99999)))),
                    ("MailboxGuid", js(&guid(&mut rng))),
                    ("MailboxOwnerSid", js("S-1-5-21-3625512817-3131419211-2211937364-27913548")),
                    ("MailboxOwnerUPN", js(&user)),
                    ("OperationProperties", "[{\"Name\":\"MailAccessType\",\"Value\":\"Bind\"},{\"Name\":\"IsThrottled\",\"Value\":\"False\"}]".to_string()),
                    ("OrganizationName", js(&domain)),
                    ("OriginatingServer", js("AM6PR04MB5254 (15.20.8182.000)")),
                    ("SessionId", js(&guid(&mut rng))),
                    ("Folders", format!("[{{\"FolderItems\":[{{\"InternetMessageId\":{},\"SizeInBytes\":{}}}],\"Id\":\"LgAAAAB2R3C1ZJ1mRJbQm0KZ4CzVAQBPzdu\",\"Path\":\"\\\\Inbox\"}}]", js(&format!("<{}@{domain}>", guid(&mut rng))), rng.gen_range(2000..900000))),
                    ("OperationCount", "1".to_string()),
                ]);
            } else {
                f.extend([
                    ("Operation", js("Set-Mailbox")),
                    ("RecordType", "1".to_string()),
                    ("ResultStatus", js("True")),
                    ("UserKey", js(&puid)),
                    ("UserType", "2".to_string()),
                    ("Version", "1".to_string()),
                    ("Workload", js("Exchange")),
                    ("ClientIP", js(&format!("{ip}:{}", rng.gen_range(1024..65535)))),
                    ("ObjectId", js(&user)),
                    ("UserId", js(&format!("admin@{domain}"))),
                    ("AppId", js("fb78d390-0c51-40cd-8e17-fdbfab77341b")),
                    ("ClientAppId", js("")),
                    ("ExternalAccess", "false".to_string()),
                    ("OrganizationName", js(&domain)),
                    ("OriginatingServer", js("DB9PR04MB8477 (15.20.8182.000)")),
                    ("Parameters", format!("[{{\"Name\":\"Identity\",\"Value\":{}}},{{\"Name\":\"ForwardingSmtpAddress\",\"Value\":\"smtp:archive@fabrikam.example\"}},{{\"Name\":\"DeliverToMailboxAndForward\",\"Value\":\"True\"}}]", js(&user))),
                    ("RequestId", js(&guid(&mut rng))),
                    ("SessionId", js(&guid(&mut rng))),
                ]);
            }
        }
        "Audit.SharePoint" => {
            let file = FILES[rng.gen_range(0..FILES.len())];
            let site = format!(
                "https://{}.sharepoint.com/sites/Finance/",
                domain.split('.').next().unwrap_or("contoso")
            );
            f.extend([
                ("Operation", js("FileAccessed")),
                ("RecordType", "6".to_string()),
                (
                    "UserKey",
                    js(&format!(
                        "i:0h.f|membership|{}@live.com",
                        puid.to_ascii_lowercase()
                    )),
                ),
                ("UserType", "0".to_string()),
                ("Version", "1".to_string()),
                ("Workload", js("SharePoint")),
                ("ClientIP", js(&ip)),
                ("ObjectId", js(&format!("{site}Shared Documents/{file}"))),
                ("UserId", js(&user)),
                ("CorrelationId", js(&guid(&mut rng))),
                ("EventSource", js("SharePoint")),
                ("ItemType", js("File")),
                ("ListId", js(&guid(&mut rng))),
                ("ListItemUniqueId", js(&guid(&mut rng))),
                ("Site", js(&guid(&mut rng))),
                ("UserAgent", ua.clone()),
                ("WebId", js(&guid(&mut rng))),
                ("HighPriorityMediaProcessing", "false".to_string()),
                (
                    "SourceFileExtension",
                    js(file.rsplit('.').next().unwrap_or("")),
                ),
                ("SiteUrl", js(&site)),
                ("SourceFileName", js(file)),
                ("SourceRelativeUrl", js("Shared Documents")),
                ("ApplicationDisplayName", js("Microsoft Office")),
                ("GeoLocation", js("EUR")),
                ("IsManagedDevice", "false".to_string()),
                ("DeviceDisplayName", js(&ip)),
            ]);
        }
        "DLP.All" => {
            f.extend([
                ("Operation", js("DlpRuleMatch")),
                ("RecordType", "11".to_string()),
                ("UserKey", js("DlpAgent")),
                ("UserType", "4".to_string()),
                ("Version", "1".to_string()),
                ("Workload", js("Exchange")),
                ("ClientIP", "null".to_string()),
                ("ObjectId", js(&format!("<{}@{domain}>", guid(&mut rng)))),
                ("UserId", js(&user)),
                ("IncidentId", js(&guid(&mut rng))),
                ("PolicyDetails", format!("[{{\"PolicyId\":{},\"PolicyName\":\"U.S. Financial Data\",\"Rules\":[{{\"Actions\":[\"NotifyUser\",\"GenerateIncidentReport\"],\"ConditionsMatched\":{{\"ConditionMatchedInNewScheme\":true,\"OtherConditions\":[{{\"Name\":\"SentTo\",\"Value\":\"partner@fabrikam.example\"}}],\"SensitiveInformation\":[{{\"Confidence\":85,\"Count\":{},\"SensitiveInformationTypeName\":\"Credit Card Number\",\"SensitiveType\":\"50842eb7-edc8-4019-85dd-5a5c1f2bb085\"}}]}},\"ManagementRuleId\":{},\"RuleId\":{},\"RuleMode\":\"Enable\",\"RuleName\":\"Low volume of content detected U.S. Financial\",\"Severity\":\"Low\"}}]}}]", js(&guid(&mut rng)), rng.gen_range(1..9), js(&guid(&mut rng)), js(&guid(&mut rng)))),
                ("SensitiveInfoDetectionIsIncluded", "false".to_string()),
                ("ExchangeMetaData", format!("{{\"BCC\":[],\"CC\":[],\"FileSize\":{},\"From\":{},\"MessageID\":{},\"RecipientCount\":1,\"Sent\":{},\"Subject\":\"Invoice details\",\"To\":[\"partner@fabrikam.example\"],\"UniqueID\":{}}}", rng.gen_range(3000..90000), js(&user), js(&format!("<{}@{domain}>", guid(&mut rng))), js(&fmt_creation(r.creation)), js(&guid(&mut rng)))),
            ]);
        }
        _ => {
            // Audit.General: Microsoft Teams.
            f.extend([
                ("Operation", js("MessageSent")),
                ("RecordType", "25".to_string()),
                ("UserKey", js(&guid(&mut rng))),
                ("UserType", "0".to_string()),
                ("Version", "1".to_string()),
                ("Workload", js("MicrosoftTeams")),
                ("ClientIP", js(&ip)),
                ("UserId", js(&user)),
                ("AADGroupId", js(&guid(&mut rng))),
                ("ChannelGuid", js(&format!("19:{}@thread.tacv2", guid(&mut rng).replace('-', "")))),
                ("ChannelName", js("General")),
                ("ChannelType", js("Standard")),
                ("ChatThreadId", js(&format!("19:{}@thread.tacv2", guid(&mut rng).replace('-', "")))),
                ("CommunicationType", js("Team")),
                ("MessageId", js(&format!("{}", rng.gen_range(1_700_000_000_000u64..1_800_000_000_000)))),
                ("MessageSizeInBytes", format!("{}", rng.gen_range(200..8000))),
                ("Members", format!("[{{\"DisplayName\":\"Alex Wilber\",\"Role\":1,\"UPN\":{}}}]", js(&user))),
                ("ParentMessageId", js("")),
                ("TeamGuid", js(&format!("19:{}@thread.tacv2", guid(&mut rng).replace('-', "")))),
                ("TeamName", js("Finance")),
                ("ItemName", js("General")),
                ("ResourceTenantId", js(tenant_id)),
                ("MessageVersion", js("Current")),
                ("ExtraProperties", format!("[{{\"Key\":\"TimeZone\",\"Value\":\"Europe/Berlin\"}},{{\"Key\":\"OsName\",\"Value\":\"Windows\"}},{{\"Key\":\"UserAgent\",\"Value\":{ua}}}]")),
            ]);
        }
    }
    if ct != "Audit.AzureActiveDirectory"
        && ct != "DLP.All"
        && !f.iter().any(|(k, _)| *k == "ResultStatus")
    {
        f.push(("ResultStatus", js("Succeeded")));
    }
    f
}
